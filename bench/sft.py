"""SFT throughput: our SFT stage against TRL's ``SFTTrainer``, same model, data, batch and optimizer.

``python bench/sft.py`` (or ``make bench``) runs every workload of this device and writes the ``sft``
(CPU) or ``sft-gpu`` section of ``bench/RESULTS.md``. ``python bench/sft.py --gpu-suite`` runs all GPU
measurements of SFT *and* the reward model (``bench/rm.py``) in one script within ``--budget`` seconds
(default 450; a run that would overrun is reported as skipped) and writes ``sft-gpu`` and ``rm-gpu``;
it needs no network once ``bash ../shared/gpu/wheels.sh`` has gathered the wheels (trl, datasets).

Workloads (tokens/s counts real, non-pad tokens of the timed steps; the first steps are warm-up):

- ``toy`` (CPU): the shipped ``sft_data/`` records, batch 8;
- ``fixed`` (GPU): 8 x 1024 random tokens per step, the first 256 masked (the shape of issue 16);
- ``gsm8k``: GSM8K train rows through our SFT tokenization (Alpaca prompt = question, response = answer +
  EOS, prompt masked), so lengths vary as in real data; batch 32 on GPU, 8 on CPU.

Implementations: ``rlhf-padded`` (padded batches), ``rlhf-packed`` (``--packing``: packed attention,
backend ``auto``), both with the fused LM loss (``--fused_loss auto``); on GPU also
``rlhf-padded-compiled`` (fixed) and ``rlhf-packed-compiled`` (+ ``--torch_compile``),
``rlhf-packed-unfused`` (``--fused_loss off``) and
``rlhf-packed-flex`` / ``rlhf-packed-flash_attn`` (other packed-attention backends, to choose by
measurement); ``trl-padded`` and ``trl-padding_free`` (TRL ``SFTTrainer``, completion-only loss; padding-free
on FlashAttention-2 where ``flash_attn`` is installed, else on sdpa with the dense block-diagonal mask
transformers builds from the restarting ``position_ids``, as the attention column says). Where
liger-kernel and Triton are installed (GPU), ``--fused_loss auto`` means liger's fused linear cross-entropy,
and three more rows run: ``rlhf-padded-liger`` and ``trl-padded-liger`` (Trainer's ``--use_liger_kernel``:
liger's RMSNorm, RoPE and SwiGLU kernels patched into the model) and ``rlhf-padded-torchloss`` (our chunked
PyTorch loss instead of liger's, to choose ``auto`` by measurement). All use AdamW (Trainer's default,
fused), no gradient checkpointing, bf16 on GPU (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from results_file import markdown_table, update_section  # noqa: E402

IMPLS = ["rlhf-padded", "rlhf-packed", "trl-padded", "trl-padding_free"]
GPU_EXTRAS = ["rlhf-packed-compiled", "rlhf-packed-unfused", "rlhf-packed-flex"]
if importlib.util.find_spec("flash_attn") is not None:
    GPU_EXTRAS.append("rlhf-packed-flash_attn")
HAS_LIGER = all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))
# seconds a row needs on an H200 (2026-11-27: an SFT row ~20 s; a cold compile of the training step ~60 s)
GPU_ROW_SECONDS = {"rlhf-padded-compiled": 90.0, "rlhf-packed-compiled": 90.0}
LIGER_ROWS = ["rlhf-padded-liger", "trl-padded-liger", "rlhf-padded-torchloss"] if HAS_LIGER else []
# workload -> (batch, warm-up steps, timed steps); None timed = the whole data set
WORKLOADS = harness.Workloads(
    "gsm8k", {"toy": (8, 5, None), "fixed": (8, 3, 10), "gsm8k_gpu": (32, 3, 10), "gsm8k_cpu": (8, 3, 20)}
)


def bench_data(model_dir: Path, workload: str, workdir: Path, n_rows: int | None) -> list[dict]:
    """Tokenized examples ``{"input_ids", "labels"}`` (labels -100 on the prompt)."""
    from transformers import AutoTokenizer

    from rlhf.data import load_dataset_dir
    from rlhf.sft import tokenize_sft_dataset

    if workload == "fixed":
        rng = random.Random(0)
        examples = []
        for _ in range(n_rows):
            ids = [1] + [rng.randrange(4, 32000) for _ in range(1022)] + [2]
            examples.append({"input_ids": ids, "labels": [-100] * 256 + ids[256:]})
        return examples
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if workload == "toy":
        rows = load_dataset_dir(harness.ROOT / "sft_data", "sft")
        return tokenize_sft_dataset(rows, tokenizer, block_size=512).to_list() * 4  # 160 steps: long enough
    folder = workdir / "gsm8k_sft"
    folder.mkdir(exist_ok=True)
    lines = harness.GSM8K_TRAIN.read_text().splitlines()[:n_rows]
    records = [{"instruction": r["question"], "output": r["answer"]} for r in map(json.loads, lines)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = load_dataset_dir(folder, "sft")
    return tokenize_sft_dataset(rows, tokenizer, block_size=1024).to_list()


def row_options(name: str) -> list[str]:
    """What a row name adds to its implementation: ``rlhf-packed-compiled`` -> ``["compiled"]``."""
    return name.split("-")[2:]


def rlhf_trainer(name, model, tokenizer, examples, common, timer):
    """Our SFT stage's trainer: padded or packed batches, the fused loss (``auto``) unless ``-unfused`` /
    ``-torchloss``; ``-compiled``: ``--torch_compile``; ``-liger``: ``--use_liger_kernel``."""
    import datasets
    from transformers import TrainingArguments

    from rlhf.sft import PaddedCollator, packed_collator
    from rlhf.sft.stage import SFTTrainer
    from rlhf.training.fused_loss import build_lm_head_loss
    from rlhf.training.packed_attention import use_packed_attention

    options = row_options(name)
    info = {"attention": "sdpa"}
    common.update(torch_compile="compiled" in options, use_liger_kernel="liger" in options)
    if "packed" in name:
        backend = next((o for o in options if o in ("flex", "flash_attn")), "auto")
        info["attention"] = use_packed_attention(model, backend).removeprefix("rlhf_packed_")
        collator = harness.CountingCollator(packed_collator(model.config._attn_implementation))
    else:
        collator = harness.CountingCollator(PaddedCollator(tokenizer.pad_token_id))
    loss = "off" if "unfused" in options else "torch" if "torchloss" in options else "auto"
    head_loss = build_lm_head_loss(model, loss)
    info["loss"] = head_loss.implementation if head_loss else "model"
    if "liger" in options:
        info["attention"] += " + liger kernels"
    trainer = SFTTrainer(
        model=model, args=TrainingArguments(**common, remove_unused_columns=False), data_collator=collator,
        train_dataset=datasets.Dataset.from_list(examples), processing_class=tokenizer, callbacks=[timer],
        compute_loss_func=head_loss,
    )  # fmt: skip
    return trainer, collator, info


def trl_trainer(name, model, tokenizer, examples, common, timer):
    import datasets
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    rows = [
        {"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
        for e in examples
    ]
    padding_free = "padding_free" in name
    args = SFTConfig(
        **common,
        use_liger_kernel="liger" in row_options(name),
        max_length=None if padding_free else 2048,
        padding_free=padding_free,
        completion_only_loss=True,
    )
    trainer = TRLSFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[timer],
    )  # fmt: skip
    collator = trainer.data_collator = harness.CountingCollator(trainer.data_collator)
    attention = model.config._attn_implementation
    if padding_free and attention == "sdpa":  # transformers turns the restarting position_ids into a mask
        attention = "sdpa, dense block mask"
    if "liger" in row_options(name):
        attention += " + liger kernels"
    return trainer, collator, {"attention": attention, "loss": "model"}


def worker(name: str, workdir: Path, workload: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpu = harness.on_gpu()
    batch, warmup, timed = WORKLOADS.shape(workload, gpu)
    model_dir = workdir / "model"
    examples = bench_data(model_dir, workload, workdir, None if timed is None else batch * (warmup + timed))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # TRL's padding-free mode wants FlashAttention-2 (on sdpa transformers builds a dense block mask)
    flash = gpu and name == "trl-padding_free" and importlib.util.find_spec("flash_attn") is not None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if gpu else torch.float32,
        **({"attn_implementation": "flash_attention_2"} if flash else {}),
    )
    model.config.use_cache = False
    if gpu:
        model.to("cuda")
    common = dict(
        output_dir=str(workdir / f"{name}-{workload}"), per_device_train_batch_size=batch, num_train_epochs=1,
        max_steps=-1 if timed is None else warmup + timed, learning_rate=1e-4, logging_steps=1000,
        save_strategy="no", report_to="none", bf16=gpu, seed=0, gradient_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    timer = harness.step_timer()
    build = rlhf_trainer if name.startswith("rlhf") else trl_trainer
    trainer, collator, info = build(name, model, tokenizer, examples, common, timer)
    trainer.train()
    tokens, seconds, steps = harness.timed_totals(timer, collator, warmup)
    padding = 1 - tokens / max(sum(collator.slots[warmup : warmup + steps]), 1)
    return {"name": name, **info, **harness.measurements(model, tokens, seconds, steps), "padding": padding}


def table(results: dict[str, list[dict]]) -> str:
    """One markdown table over workloads; ratios against TRL padded of the same workload."""
    rows = []
    for workload, runs in results.items():
        base = next((r for r in runs if r["name"] == "trl-padded" and "error" not in r), None)
        for r in runs:
            if "error" in r:
                rows.append([workload, r["name"], "error: " + r["error"][:90], "", "", "", "", ""])
                continue
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "n/a"
            mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
            rows.append([
                workload, r["name"], f"{r['tokens_per_s']:,.0f}", ratio, f"{r['peak_mb']:,.0f}", mfu,
                f"{r['padding']:.0%}", f"{r['attention']} / {r['loss']}{harness.compile_note(r)}",
            ])  # fmt: skip
    header = ["workload", "implementation", "real tokens/s", "vs TRL padded", "peak MB", "MFU", "padding",
              "attention / loss"]  # fmt: skip
    return markdown_table(header, rows)


def section(results: dict[str, list[dict]], gpu: bool, note: str = "") -> str:
    batch = "fixed: 8 x 1024 tokens; gsm8k: 32 examples" if gpu else "toy and gsm8k: 8 examples"
    return harness.section_text("SFT throughput", "bench/sft.py", batch, table(results), note)


def gpu_suite(budget: float) -> None:
    """All GPU runs of SFT and the reward model in one script, within ``budget`` seconds."""
    import rm as rm_bench

    deadline = harness.Deadline(budget, GPU_ROW_SECONDS)
    sft_results: dict[str, list[dict]] = {w: [] for w in WORKLOADS.names(True)}
    rm_results: dict[str, list[dict]] = {w: [] for w in rm_bench.WORKLOADS.names(True)}
    sft_script, rm_script = __file__, str(Path(__file__).resolve().parent / "rm.py")
    varied = "gsm8k" if "gsm8k" in sft_results else "fixed"
    rm_varied = "hh" if "hh" in rm_results else "fixed"
    # most important first: the MFU target (fixed), packing on real lengths, the reward model on real pairs;
    # the MFU target (fixed) with and without --torch_compile first
    # (the compiled row, whose cold compile of the whole training step takes a minute, after the reward model)
    plan = [(sft_script, sft_results, "fixed", n) for n in ("rlhf-padded", "trl-padded", *LIGER_ROWS[:1])]
    plan += [(sft_script, sft_results, varied, n) for n in IMPLS if varied != "fixed"]
    plan += [(rm_script, rm_results, rm_varied, n) for n in ("rlhf-packed", "trl", "rlhf-padded")]
    plan += [(sft_script, sft_results, "fixed", "rlhf-padded-compiled")]
    plan += [(sft_script, sft_results, "fixed", n) for n in IMPLS if n not in ("rlhf-padded", "trl-padded")]
    plan += [(sft_script, sft_results, varied, n) for n in GPU_EXTRAS]
    plan += [(sft_script, sft_results, "fixed", n) for n in LIGER_ROWS[1:]]
    plan += [(rm_script, rm_results, w, n) for w in rm_results for n in rm_bench.IMPLS if w != rm_varied]
    plan += [(rm_script, rm_results, rm_varied, n) for n in rm_bench.GPU_EXTRAS]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        harness.build_bench_model(workdir / "model")
        for script, results, workload, name in plan:
            results[workload].append(deadline.run(script, name, workdir, ("--workload", workload)))
            print(
                json.dumps({"script": Path(script).name, "workload": workload, **results[workload][-1]}),
                flush=True,
            )
    note = f"One `python bench/sft.py --gpu-suite` run (budget {budget:.0f} s)."
    text = section(sft_results, True, note)
    print(text)
    update_section("sft-gpu", text)
    text = rm_bench.section(rm_results, True, note)
    print(text)
    update_section("rm-gpu", text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help="internal: run one implementation")
    parser.add_argument("--workdir")
    parser.add_argument("--workload", default="toy")
    parser.add_argument("--gpu-suite", action="store_true", help="all GPU runs of SFT and RM, one script")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for --gpu-suite (default 450)")
    args = parser.parse_args()
    if args.worker:
        harness.report(worker(args.worker, Path(args.workdir), args.workload))
        return
    if args.gpu_suite:
        if not harness.on_gpu():
            sys.exit("error: --gpu-suite needs a GPU")
        gpu_suite(args.budget)
        return
    gpu = harness.on_gpu()
    results = harness.run_workloads(
        __file__, IMPLS + (GPU_EXTRAS + LIGER_ROWS if gpu else []), WORKLOADS.names(gpu)
    )
    text = section(results, gpu)
    print(text)
    update_section("sft-gpu" if gpu else "sft", text)


if __name__ == "__main__":
    main()
