"""``make demo``: the whole pipeline on the toy task, on a laptop CPU, in minutes.

Stages (each is the user-facing entry point, run as a subprocess exactly as a user would):

0. ``python -m rlhf.tiny_models``: a random-init tiny llama with a locally trained tokenizer;
1. ``run_sft_with_peft.py``: full fine-tuning on ``sft_data/`` (LoRA barely moves a random-init model, so
   this pass doubles as the pretraining the tiny model never had);
2. ``run_rm_with_peft.py``: a LoRA reward model (with its score head) on ``rm_data/``, on the SFT model;
3. ``run_ppo_with_peft.py``: PPO with actor/critic LoRA adapters against that reward adapter, mixing in
   the pretraining loss on ``pt_data/``;
4. report: ``summary.json``, PNG plots (``python -m rlhf.plot``) and ``report.md`` with sample responses
   before and after PPO.

``--quick`` shortens every stage (the test suite uses it to check the report is written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf.data.templates import alpaca_prompt
from rlhf.logging_setup import setup_logging
from rlhf.plot import plot_run, read_metrics_jsonl, read_trainer_state
from rlhf.toy_task import positivity_reward

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TOPICS = ["cats", "the sea", "winter", "music", "trains", "bread", "the moon", "football"]

# (full, quick) settings per stage
SETTINGS = {
    "hidden_size": ("96", "64"),
    "sft_epochs": ("14", "1"),
    "sft_max_steps": ("-1", "6"),
    "rm_epochs": ("2", "1"),
    "rm_max_steps": ("-1", "4"),
    "ppo_max_steps": ("96", "4"),
}


def run_stage(name: str, argv: list[str], log_dir: Path) -> float:
    """Run one entry point as a subprocess, streaming its output (progress bars included) to the terminal
    and to ``log_dir/<name>.log``; return its wall time in seconds."""
    logger.info("== stage %s: %s", name, " ".join(argv))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "offline")
    start = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"demo: stage {name} failed (exit {proc.returncode}); see {log_dir / name}.log")
    return time.time() - start


def first_last_means(points: list[tuple[float, float]], k: int = 3) -> tuple[float, float]:
    """Means of the first and last ``k`` values of a curve (``k`` shrinks for short curves)."""
    values = [value for _, value in points]
    k = max(1, min(k, len(values) // 2))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def sample_responses(model_dir: Path, adapter_dir: Path | None, prompts: list[str], seed: int) -> list[str]:
    """Sampled responses (temperature 1, up to 24 tokens) of a model, or of an adapter on it, to ``prompts``,
    from the generator PPO samples with (``--generation_engine auto``: the rollout engine for the llama)."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.generation import SamplingConfig, build_generator

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    torch.manual_seed(seed)  # HF generate (auto on another architecture) samples from the global RNG
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    sampling = SamplingConfig(
        max_new_tokens=24, min_new_tokens=0, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    generator = build_generator(
        "auto", lambda: nullcontext(model), sampling, max_prompt_length=batch["input_ids"].shape[1],
        max_batch_size=len(prompts), generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    out = generator.generate(batch["input_ids"], batch["attention_mask"])
    rows = [ids[:n].tolist() for ids, n in zip(out.response_ids, out.response_mask.sum(1))]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def stage_commands(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """The entry-point command of every stage, as a user would type it."""
    pick = {key: value[1] if quick else value[0] for key, value in SETTINGS.items()}
    py = sys.executable
    base, sft, rm, actor, critic = (
        out / "base",
        out / "sft",
        out / "rm",
        out / "ppo_actor",
        out / "ppo_critic",
    )
    common = [
        "--seed",
        "512",
        "--report_to",
        "none",
        "--overwrite_output_dir",
        "--data_cache_dir",
        str(out / "cache"),
    ]
    return [
        ("tiny", [py, "-m", "rlhf.tiny_models", "--arch", "llama", "--out", str(base),
                  "--hidden_size", pick["hidden_size"]]),
        ("sft", [py, "run_sft_with_peft.py", "--model_type", "llama", "--model_name_or_path", str(base),
                 "--dataset_dir", "sft_data", "--split_ratio", "0.05", "--block_size", "128",
                 "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
                 "--do_train", "--do_eval", "--num_train_epochs", pick["sft_epochs"],
                 "--max_steps", pick["sft_max_steps"], "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine",
                 "--warmup_ratio", "0.03", "--weight_decay", "0", "--logging_steps", "10",
                 "--logging_first_step", "True", "--eval_strategy", "steps", "--eval_steps", "50",
                 "--save_strategy", "no", "--lora_rank", "-1", "--output_dir", str(sft), *common]),
        ("rm", [py, "run_rm_with_peft.py", "--model_type", "llama", "--model_name_or_path", str(sft),
                "--dataset_dir", "rm_data", "--split_ratio", "0.1", "--max_length", "128", "--block_size", "128",
                "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                "--do_train", "--do_eval", "--num_train_epochs", pick["rm_epochs"], "--max_steps", pick["rm_max_steps"],
                "--learning_rate", "2e-3", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
                "--logging_steps", "5", "--logging_first_step", "True", "--eval_strategy", "steps",
                "--eval_steps", "10", "--save_strategy", "no", "--lora_rank", "8", "--lora_alpha", "32",
                "--lora_dropout", "0.05", "--output_dir", str(rm), *common]),
        ("ppo", [py, "run_ppo_with_peft.py", "--model_type", "llama", "--sft_model_path", str(sft),
                 "--reward_lora_path", str(rm), "--dataset_dir", "sft_data", "--pretrain_dataset_dir", "pt_data",
                 "--per_device_train_batch_size", "32", "--per_device_mini_train_batch_size", "16",
                 "--gradient_accumulation_steps", "1", "--ppo_epochs", "2", "--max_steps", pick["ppo_max_steps"],
                 "--actor_lr", "5e-4", "--critic_lr", "2e-3", "--lr_scheduler_type", "constant",
                 "--logging_steps", "4", "--save_steps", "48", "--max_prompt_length", "96",
                 "--max_response_length", "24", "--top_k", "50",  # as the run measured in the README sampled
                 "--kl_penalty_beta", "0.1", "--pretrain_loss_weight", "0.1",
                 "--pretrain_warmup_steps", "10", "--output_dir", str(actor), "--critic_output_dir", str(critic),
                 *common]),
    ]  # fmt: skip


def write_report(
    out: Path, summary: dict, plots: list[Path], samples: dict[str, list[str]], prompts: list[str]
) -> None:
    """``report.md``: the numbers, the plots and sample responses before/after PPO."""
    lines = [
        "# rlhf demo report",
        "",
        "Tiny llama, toy task *say how you feel about a topic* (positive answers preferred). "
        "Every stage ran through its user-facing entry point; commands and logs are in `logs/`.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in summary.items()],
        "",
        "## Curves",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots],
        "",
        "## Sample responses (sampled at temperature 1, same seed)",
        "",
        "| prompt topic | SFT model | after PPO |",
        "|---|---|---|",
    ]
    for topic, before, after in zip(SAMPLE_TOPICS * 4, samples["sft"], samples["ppo"]):
        lines.append(f"| {topic} | {before.strip() or '(empty)'} | {after.strip() or '(empty)'} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="runs/demo", help="where the demo writes models, logs and its report"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (for tests)")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    stage_seconds = {}
    for name, command in stage_commands(out, args.quick):
        stage_seconds[name] = round(run_stage(name, command, out / "logs"), 1)

    sft_state = read_trainer_state(out / "sft" / "trainer_state.json")
    rm_state = read_trainer_state(out / "rm" / "trainer_state.json")
    ppo_metrics = read_metrics_jsonl(out / "ppo_actor" / "metrics.jsonl")
    sft_first, sft_last = first_last_means(sft_state["loss"])
    ppo_first, ppo_last = first_last_means(ppo_metrics["reward/score"])
    prompts = [alpaca_prompt(f"Tell me how you feel about {topic}.") for topic in SAMPLE_TOPICS * 4]
    samples = {
        "sft": sample_responses(out / "sft", None, prompts, seed=0),
        "ppo": sample_responses(out / "sft", out / "ppo_actor", prompts, seed=0),
    }
    positivity = {
        name: sum(positivity_reward(prompts, texts)) / len(texts) for name, texts in samples.items()
    }
    summary = {
        "sft_loss_first": round(sft_first, 4),
        "sft_loss_last": round(sft_last, 4),
        "rm_eval_accuracy": round(rm_state["eval_accuracy"][-1][1], 4),
        "ppo_reward_first": round(ppo_first, 4),
        "ppo_reward_last": round(ppo_last, 4),
        "positivity_before_ppo": round(positivity["sft"], 3),
        "positivity_after_ppo": round(positivity["ppo"], 3),
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.time() - start, 1),
    }
    plots_dir = out / "plots"
    plots = []
    for prefix, run_dir in (("sft", out / "sft"), ("rm", out / "rm"), ("ppo", out / "ppo_actor")):
        plots += plot_run(run_dir, plots_dir, prefix=prefix)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    key_plots = [
        p for p in plots if p.stem in ("sft_loss", "rm_eval_accuracy", "ppo_reward_score", "ppo_objective_kl")
    ]
    write_report(out, summary, key_plots, samples, prompts)
    print(json.dumps(summary, indent=2))
    print(f"report: {out / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
