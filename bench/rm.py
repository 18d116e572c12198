"""Reward-model throughput: our reward stage against TRL's ``RewardTrainer``, same model, pairs and batch.

``python bench/rm.py`` (or ``make bench``) prints a table and writes the ``rm`` section of
``bench/RESULTS.md``. CPU: a small llama on the shipped toy pairs (``rm_data/``). GPU: a
TinyLlama-1.1B-shaped random-init model in bf16 on pairs of 512-token sides.

Both trainers get the same pre-tokenized pairs (``chosen_ids``/``rejected_ids``), batch 8 pairs, AdamW,
no gradient checkpointing; pairs/s counts the timed steps (the first steps are warm-up).
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

IMPLS = ["rlhf", "trl"]
WARMUP_STEPS = 3


def bench_pairs(model_dir: Path, gpu: bool) -> list[dict]:
    from transformers import AutoTokenizer

    from rlhf.data import load_dataset_dir
    from rlhf.reward import clean_pairs, tokenize_pairs

    if gpu:
        rng = random.Random(0)
        pairs = []
        for _ in range(8 * 30):
            prompt = [1] + [rng.randrange(4, 32000) for _ in range(255)]
            pairs.append(
                {
                    "chosen_ids": prompt + [rng.randrange(4, 32000) for _ in range(255)] + [2],
                    "rejected_ids": prompt + [rng.randrange(4, 32000) for _ in range(255)] + [2],
                    "margin": 0.0,
                }
            )
        return pairs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = clean_pairs(load_dataset_dir(harness.ROOT / "rm_data", "preference"))
    return tokenize_pairs(rows, tokenizer, max_length=512, max_response=512).to_list() * 3  # 120 steps


def worker(name: str, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from rlhf.reward import PairCollator
    from rlhf.reward.trainer import RewardTrainer

    gpu = harness.on_gpu()
    model_dir = workdir / "model"
    pairs = bench_pairs(model_dir, gpu)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.bfloat16 if gpu else torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    common = dict(
        output_dir=str(workdir / name), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-5,
        logging_steps=1000, save_strategy="no", report_to="none", bf16=gpu, seed=0, gradient_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    timer = harness.step_timer()
    if name == "rlhf":
        collator = harness.CountingCollator(PairCollator(tokenizer.pad_token_id))
        trainer = RewardTrainer(
            model=model, args=TrainingArguments(**common, remove_unused_columns=False), data_collator=collator,
            train_dataset=datasets.Dataset.from_list(pairs), processing_class=tokenizer, callbacks=[timer],
        )  # fmt: skip
    else:
        from trl import RewardConfig
        from trl import RewardTrainer as TRLRewardTrainer

        rows = [{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in pairs]
        trainer = TRLRewardTrainer(
            model=model, args=RewardConfig(**common, max_length=None), train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[timer],
        )  # fmt: skip
        collator = trainer.data_collator = harness.CountingCollator(trainer.data_collator)
    trainer.train()
    tokens, seconds, timed = harness.timed_totals(timer, collator, WARMUP_STEPS)
    n_pairs = sum(collator.rows[WARMUP_STEPS : WARMUP_STEPS + timed])
    return {
        "name": name,
        "pairs_per_s": n_pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mb": harness.peak_memory_mb(),
        "steps": timed,
    }


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
        results = harness.run_alternating(__file__, IMPLS, workdir, key="pairs_per_s")
    base = next((r for r in results if r["name"] == "trl" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "error: " + r["error"][:80], "", "", ""])
            continue
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if base else "n/a"
        rows.append(
            [
                r["name"],
                f"{r['pairs_per_s']:,.1f}",
                ratio,
                f"{r['tokens_per_s']:,.0f}",
                f"{r['peak_mb']:,.0f}",
            ]
        )
    device = (
        "GPU " + __import__("torch").cuda.get_device_name()
        if gpu
        else "CPU (small llama, hidden 256, 4 layers)"
    )
    table = markdown_table(["implementation", "pairs/s", "vs TRL", "tokens/s", "peak MB"], rows)
    text = (
        f"## Reward model throughput ({device})\n\nbatch 8 pairs, AdamW, {'bf16' if gpu else 'fp32'}, no gradient "
        f"checkpointing; peak MB is CUDA max allocated on GPU, max RSS of the process on CPU (one thread; best of 2 alternating runs).\n\n{table}\n"
    )
    print(text)
    update_section("rm", text)


if __name__ == "__main__":
    main()
