"""SFT throughput: our SFT stage against TRL's ``SFTTrainer``, same model, data, batch and optimizer.

``python bench/sft.py`` (or ``make bench``) prints a table and writes the ``sft`` section of
``bench/RESULTS.md``. CPU: a small llama on the shipped toy SFT data. GPU: a TinyLlama-1.1B-shaped
random-init model in bf16 on 8 x 1024-token examples per step, with MFU.

tokens/s counts real (non-pad) tokens of the timed steps (the first steps are warm-up and not timed).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from results_file import markdown_table, update_section  # noqa: E402

IMPLS = ["rlhf-padded", "rlhf-packed", "trl-padded", "trl-padding_free"]
GPU_IMPLS = ["rlhf-packed-compiled"]
WARMUP_STEPS = 5


def bench_data(model_dir: Path, gpu: bool) -> list[dict]:
    """Tokenized examples ``{"input_ids", "labels"}`` (labels -100 on the prompt)."""
    from transformers import AutoTokenizer

    from rlhf.data import load_dataset_dir
    from rlhf.sft import tokenize_sft_dataset

    if gpu:
        rng = random.Random(0)
        examples = []
        for _ in range(8 * 40):
            ids = [1] + [rng.randrange(4, 32000) for _ in range(1022)] + [2]
            examples.append({"input_ids": ids, "labels": [-100] * 256 + ids[256:]})
        return examples
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_dataset_dir(harness.ROOT / "sft_data", "sft")
    return (
        tokenize_sft_dataset(rows, tokenizer, block_size=512).to_list() * 4
    )  # 160 steps: long enough to time


def worker(name: str, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from rlhf.sft import PaddedCollator, packed_collator
    from rlhf.sft.stage import SFTTrainer

    gpu = harness.on_gpu()
    model_dir = workdir / "model"
    examples = bench_data(model_dir, gpu)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    if gpu:
        model.to("cuda")
    common = dict(
        output_dir=str(workdir / name), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-4,
        logging_steps=1000, save_strategy="no", report_to="none", bf16=gpu, seed=0, gradient_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    timer = harness.step_timer()
    if name.startswith("rlhf"):
        if name == "rlhf-packed-compiled":
            common.update(torch_compile=True, optim="adamw_torch_fused")
        args = TrainingArguments(**common, remove_unused_columns=False)
        if "packed" in name:
            collator = harness.CountingCollator(packed_collator(model.config._attn_implementation))
        else:
            collator = harness.CountingCollator(PaddedCollator(tokenizer.pad_token_id))
        trainer = SFTTrainer(
            model=model, args=args, data_collator=collator, train_dataset=datasets.Dataset.from_list(examples),
            processing_class=tokenizer, callbacks=[timer],
        )  # fmt: skip
    else:
        from trl import SFTConfig
        from trl import SFTTrainer as TRLSFTTrainer

        rows = [
            {"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
            for e in examples
        ]
        padding_free = name.endswith("padding_free")
        args = SFTConfig(
            **common,
            max_length=None if padding_free else 2048,
            padding_free=padding_free,
            completion_only_loss=True,
        )
        trainer = TRLSFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
            callbacks=[timer],
        )  # fmt: skip
        collator = trainer.data_collator = harness.CountingCollator(trainer.data_collator)
    trainer.train()
    timed = len(timer.ends) - WARMUP_STEPS
    seconds = timer.ends[-1] - timer.ends[WARMUP_STEPS - 1]
    tokens = sum(collator.tokens[WARMUP_STEPS : WARMUP_STEPS + timed])
    result = {
        "name": name,
        "tokens_per_s": tokens / seconds,
        "peak_mb": harness.peak_memory_mb(),
        "steps": timed,
    }
    if gpu:
        result["mfu"] = (
            result["tokens_per_s"] * harness.model_flops_per_token(model) / harness.PEAK_FLOPS["cuda"]
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help="internal: run one implementation")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        harness.report(worker(args.worker, Path(args.workdir)))
        return
    gpu = harness.on_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        harness.build_bench_model(workdir / "model")
        results = harness.run_alternating(__file__, IMPLS + (GPU_IMPLS if gpu else []), workdir)
    base = next((r for r in results if r["name"] == "trl-padded" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "error: " + r["error"][:80], "", "", ""])
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "n/a"
        mfu = f"{r['mfu']:.2f}" if "mfu" in r else "-"
        rows.append([r["name"], f"{r['tokens_per_s']:,.0f}", ratio, f"{r['peak_mb']:,.0f}", mfu])
    device = (
        "GPU " + __import__("torch").cuda.get_device_name()
        if gpu
        else "CPU (small llama, hidden 256, 4 layers)"
    )
    table = markdown_table(["implementation", "tokens/s", "vs TRL padded", "peak MB", "MFU"], rows)
    text = f"## SFT throughput ({device})\n\nbatch 8, AdamW, {'bf16' if gpu else 'fp32'}; " \
           f"peak MB is CUDA max allocated on GPU, max RSS of the process on CPU (one thread; best of 2 alternating runs).\n\n{table}\n"  # fmt: skip
    print(text)
    update_section("sft", text)


if __name__ == "__main__":
    main()
