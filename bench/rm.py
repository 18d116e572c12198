"""Reward-model throughput: our reward stage against TRL's ``RewardTrainer``, same model, pairs and batch.

``python bench/rm.py`` (or ``make bench``) runs every workload of this device and writes the ``rm`` (CPU)
or ``rm-gpu`` section of ``bench/RESULTS.md``; ``python bench/sft.py --gpu-suite`` runs these GPU
measurements together with SFT's in one script.

Workloads (pairs/s and real, non-pad tokens/s over the timed steps; the first steps are warm-up):

- ``toy`` (CPU): the shipped ``rm_data/`` pairs, batch 8 pairs;
- ``fixed`` (GPU): pairs of 512-token sides sharing a 256-token prompt, batch 8 pairs;
- ``hh``: Anthropic-HH harmless-base pairs through our tokenization (prompt cut from the left to
  ``--max_length 1024``, responses to 512), lengths as in real data; batch 16 pairs on GPU, 8 on CPU.

Implementations: ``rlhf-padded`` (chosen and rejected of a batch in one padded forward), ``rlhf-packed``
(``--packing``: all 2B sides in one padding-free row, packed attention ``auto``), on GPU also
``rlhf-packed-compiled`` (+ ``--torch_compile``); ``trl`` (TRL ``RewardTrainer``). Same pre-tokenized
pairs, AdamW (Trainer's default, fused), no gradient checkpointing, bf16 on GPU (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from results_file import markdown_table, update_section  # noqa: E402

IMPLS = ["rlhf-padded", "rlhf-packed", "trl"]
GPU_EXTRAS = ["rlhf-packed-compiled"]
# workload -> (pairs per step, warm-up steps, timed steps); None timed = the whole data set
WORKLOADS = harness.Workloads(
    "hh", {"toy": (8, 3, None), "fixed": (8, 3, 10), "hh_gpu": (16, 3, 10), "hh_cpu": (8, 3, 15)}
)


def bench_pairs(model_dir: Path, workload: str, n_pairs: int | None) -> list[dict]:
    """Tokenized pairs ``{"chosen_ids", "rejected_ids", "margin"}``."""
    from transformers import AutoTokenizer

    from rlhf.data import load_dataset_dir
    from rlhf.reward import clean_pairs, tokenize_pairs

    if workload == "fixed":
        rng = random.Random(0)
        pairs = []
        for _ in range(n_pairs):
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
    if workload == "toy":
        rows = clean_pairs(load_dataset_dir(harness.ROOT / "rm_data", "preference"))
        return tokenize_pairs(rows, tokenizer, max_length=512, max_response=512).to_list() * 3  # 120 steps
    rows = clean_pairs(load_dataset_dir(harness.HH_PAIRS, "preference"))
    rows = rows.shuffle(seed=0).select(range(min(n_pairs, len(rows))))
    return tokenize_pairs(rows, tokenizer, max_length=1024, max_response=512).to_list()


def worker(name: str, workdir: Path, workload: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from rlhf.reward import PairCollator
    from rlhf.reward.packing import PackedPairCollator
    from rlhf.reward.trainer import RewardTrainer
    from rlhf.training.packed_attention import use_packed_attention

    gpu = harness.on_gpu()
    batch, warmup, timed = WORKLOADS.shape(workload, gpu)
    model_dir = workdir / "model"
    pairs = bench_pairs(model_dir, workload, None if timed is None else batch * (warmup + timed))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.bfloat16 if gpu else torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    common = dict(
        output_dir=str(workdir / f"rm-{name}-{workload}"), per_device_train_batch_size=batch, num_train_epochs=1,
        max_steps=-1 if timed is None else warmup + timed, learning_rate=1e-5, logging_steps=1000,
        save_strategy="no", report_to="none", bf16=gpu, seed=0, gradient_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True, torch_compile=name.endswith("-compiled"),
    )  # fmt: skip
    timer = harness.step_timer()
    attention = "sdpa"
    if name.startswith("rlhf"):
        if "packed" in name:
            attention = use_packed_attention(model, "auto").removeprefix("rlhf_packed_")
            collator = harness.CountingCollator(PackedPairCollator())
        else:
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
    tokens, seconds, steps = harness.timed_totals(timer, collator, warmup)
    n_pairs = sum(collator.rows[warmup : warmup + steps])
    padding = 1 - tokens / max(sum(collator.slots[warmup : warmup + steps]), 1)
    measured = harness.measurements(model, tokens, seconds, steps)
    return {
        "name": name,
        "attention": attention,
        "pairs_per_s": n_pairs / seconds,
        **measured,
        "padding": padding,
    }


def table(results: dict[str, list[dict]]) -> str:
    """One markdown table over workloads; ratios against TRL's pairs/s on the same workload."""
    rows = []
    for workload, runs in results.items():
        base = next((r for r in runs if r["name"] == "trl" and "error" not in r), None)
        for r in runs:
            if "error" in r:
                rows.append([workload, r["name"], "error: " + r["error"][:90], "", "", "", "", "", ""])
                continue
            ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if base else "n/a"
            mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
            rows.append([
                workload, r["name"], f"{r['pairs_per_s']:,.1f}", ratio, f"{r['tokens_per_s']:,.0f}",
                f"{r['peak_mb']:,.0f}", mfu, f"{r['padding']:.0%}", r["attention"] + harness.compile_note(r),
            ])  # fmt: skip
    header = ["workload", "implementation", "pairs/s", "vs TRL", "real tokens/s", "peak MB", "MFU", "padding",
              "attention"]  # fmt: skip
    return markdown_table(header, rows)


def section(results: dict[str, list[dict]], gpu: bool, note: str = "") -> str:
    batch = "fixed: 8 pairs of 512-token sides; hh: 16 pairs" if gpu else "toy and hh: 8 pairs"
    return harness.section_text("Reward model throughput", "bench/rm.py", batch, table(results), note)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help="internal: run one implementation")
    parser.add_argument("--workdir")
    parser.add_argument("--workload", default="toy")
    args = parser.parse_args()
    if args.worker:
        harness.report(worker(args.worker, Path(args.workdir), args.workload))
        return
    gpu = harness.on_gpu()
    names = IMPLS + (GPU_EXTRAS if gpu else [])
    results = harness.run_workloads(__file__, names, WORKLOADS.names(gpu), key="pairs_per_s")
    text = section(results, gpu)
    print(text)
    update_section("rm-gpu" if gpu else "rm", text)


if __name__ == "__main__":
    main()
