"""The speed flags change no numbers: SFT and the reward model with ``--packing --torch_compile --optim
adamw_torch_fused`` (and the fused LM loss, SFT's default) log the same losses and evaluation metrics as a
plain eager, padded run with the model's own loss, with LoRA and with full fine-tuning, and still save
models that load with plain transformers / peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from run_rm_with_peft import main as rm_main
from run_sft_with_peft import main as sft_main

FAST = ["--packing", "--torch_compile", "--optim", "adamw_torch_fused"]


def _argv(model: Path, data: Path, out: Path, lora: bool, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_dir", str(data), "--output_dir", str(out),
        "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_steps", "3", "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no",
        "--split_ratio", "0.1", "--logging_steps", "1", "--seed", "7", "--lora_rank", "8" if lora else "-1",
        "--lora_dropout", "0",  # dropout masks depend on the batch layout (padded or packed)
        "--data_cache_dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def _train_losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def _compare(eager: dict, fast: dict, eager_out: Path, fast_out: Path, keys: tuple[str, ...]) -> None:
    losses = _train_losses(eager_out)
    assert len(losses) == 3
    assert _train_losses(fast_out) == pytest.approx(losses, rel=1e-4)
    for key in keys:
        assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_speed_flags_match_the_plain_run(tiny_llama, repo_root, tmp_path, lora):
    data = repo_root / "sft_data"
    eager = sft_main(_argv(tiny_llama, data, tmp_path / "eager", lora, "--fused_loss", "off"))
    fast = sft_main(_argv(tiny_llama, data, tmp_path / "fast", lora, *FAST))
    _compare(eager, fast, tmp_path / "eager", tmp_path / "fast", ("eval_loss",))
    if lora:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "fast")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast")
        assert reloaded.config._attn_implementation == "sdpa"
        assert reloaded.config.use_cache  # the training forwards turn the cache off, not the saved config


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reward_speed_flags_match_the_plain_run(tiny_llama, repo_root, tmp_path, lora):
    data = repo_root / "rm_data"
    extra = ("--max_length", "128", "--block_size", "64")
    eager = rm_main(_argv(tiny_llama, data, tmp_path / "eager", lora, *extra))
    fast = rm_main(_argv(tiny_llama, data, tmp_path / "fast", lora, *extra, *FAST))
    _compare(
        eager, fast, tmp_path / "eager", tmp_path / "fast", ("eval_loss", "eval_accuracy", "eval_margin")
    )
    if lora:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
        PeftModel.from_pretrained(base, tmp_path / "fast")
    else:
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "fast", num_labels=1)
