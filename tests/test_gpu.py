"""The reference commands on a CUDA GPU in fp16 and bf16 (``make test-gpu``; skipped without CUDA).

Each stage's seed command is the one its CPU test runs (same argv builders), for a couple of steps on a
tiny model, with the GPU-only precision flags in force instead of dropped: SFT and the reward model under
``torchrun``, PPO under ``accelerate launch --config_file default_config.yaml``, PPO save and resume, and
``python -m rlhf.tp.solver_evaluate`` at world size 1 on a split tiny model. ``make test`` deselects these
tests (marker ``gpu``); the whole file takes a few minutes on one GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO_ROOT, script_env, torchrun
from safetensors.torch import load_file
from test_ppo_models import build_rm_adapter
from test_ppo_run import read_metrics, reference_command, resume_argv
from test_reward_stage import SEED_FLAGS as RM_SEED_FLAGS
from test_sft_outputs import with_flags
from test_sft_stage import seed_argv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with make test-gpu)"),
]

PRECISIONS = [
    pytest.param("fp16", id="fp16"),
    pytest.param(
        "bf16",
        id="bf16",
        marks=pytest.mark.skipif(
            torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16"
        ),
    ),
]
FALLBACK_WARNING = "need a GPU"  # what rlhf.args says when it drops --fp16/--bf16 on a CPU machine
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "default_config.yaml"]


def in_precision(argv: list[str], precision: str) -> list[str]:
    """``argv`` (a seed command with ``--fp16 --torch_dtype float16``) switched to ``precision``."""
    argv = [arg for arg in argv if arg not in ("--fp16", "--bf16")] + [f"--{precision}"]
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    return with_flags(argv, torch_dtype=dtype)


def reporting(argv: list[str]) -> list[str]:
    """The seed commands log to wandb (offline); a GPU image without wandb logs nowhere instead."""
    return argv if importlib.util.find_spec("wandb") else with_flags(argv, report_to="none")


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert FALLBACK_WARNING not in proc.stderr, "the precision flags were dropped: no GPU in the child?"
    return proc


def logged_losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def assert_finite_trained_adapter(path: Path) -> None:
    weights = load_file(path)
    assert all(torch.isfinite(v).all() for v in weights.values()), path
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "the adapter did not move"


@pytest.fixture(scope="module")
def rm_adapter(tiny_llama, tmp_path_factory) -> Path:
    return build_rm_adapter(tiny_llama, tmp_path_factory.mktemp("gpu-rm") / "rm")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sft_seed_command(tiny_llama, tmp_path, precision):
    out = tmp_path / "sft"
    argv = seed_argv(tiny_llama, REPO_ROOT / "sft_data", out, tmp_path / "cache")
    argv = with_flags(argv, max_steps="2", logging_steps="1", eval_steps="2", save_steps="2")
    run(
        [*torchrun(1), str(REPO_ROOT / "run_sft_with_peft.py"), *reporting(in_precision(argv, precision))],
        tmp_path,
    )
    losses = logged_losses(out)
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert_finite_trained_adapter(out / "adapter_model.safetensors")
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reward_seed_command(tiny_llama, tmp_path, precision):
    out = tmp_path / "rm"
    argv = RM_SEED_FLAGS.format(
        model=tiny_llama, data=REPO_ROOT / "rm_data", out=out, cache=tmp_path / "c"
    ).split()
    argv = with_flags(argv, max_steps="2", logging_steps="1", eval_steps="2", save_steps="2")
    run(
        [*torchrun(1), str(REPO_ROOT / "run_rm_with_peft.py"), *reporting(in_precision(argv, precision))],
        tmp_path,
    )
    losses = logged_losses(out)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    weights = load_file(out / "adapter_model.safetensors")
    assert any("score" in k for k in weights) and all(torch.isfinite(v).all() for v in weights.values())
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ppo_seed_command_under_accelerate_launch(tiny_llama, rm_adapter, tmp_path, precision):
    argv = reference_command(tiny_llama, rm_adapter, tmp_path)
    argv = with_flags(argv, max_steps="2", logging_steps="1", save_steps="2", max_response_length="48")
    run([*ACCELERATE, "run_ppo_with_peft.py", *reporting(in_precision(argv, precision))], REPO_ROOT)
    actor, critic = tmp_path / "actor", tmp_path / "critic"
    assert [m["step"] for m in read_metrics(actor / "metrics.jsonl")] == [1, 2]
    assert all(math.isfinite(m["loss/policy"]) for m in read_metrics(actor / "metrics.jsonl"))
    assert_finite_trained_adapter(actor / "adapter_model.safetensors")
    assert (critic / "value_head.safetensors").is_file() and (
        actor / "checkpoint-2" / "optimizer.pt"
    ).is_file()


def test_ppo_do_eval_on_the_gpu_engine(tiny_llama, rm_adapter, tmp_path):
    """--do_eval under bf16: greedy evaluations through the CUDA-graph engine, scored by the reward adapter."""
    argv = reference_command(tiny_llama, rm_adapter, tmp_path)
    argv = with_flags(argv, max_steps="2", logging_steps="1", save_steps="2", max_response_length="48")
    argv = [*reporting(in_precision(argv, "bf16")), "--do_eval", "--split_ratio", "0.1"]
    run([*ACCELERATE, "run_ppo_with_peft.py", *argv], REPO_ROOT)
    actor = tmp_path / "actor"
    evals = [m for m in read_metrics(actor / "metrics.jsonl") if "eval/score" in m]
    assert [m["step"] for m in evals] == [0, 1, 2] and all(math.isfinite(m["eval/score"]) for m in evals)
    samples = read_metrics(actor / "eval_samples.jsonl")
    assert len(samples) == 3 * evals[0]["eval/prompts"] and all(math.isfinite(s["score"]) for s in samples)


def test_ppo_bf16_ratios_are_one_before_a_rollouts_first_step(tiny_llama, tmp_path):
    """Four mini-batches of uneven prompts before the rollout's one optimizer step, in bf16 on the GPU's
    kernels: the rollout's forwards ran at the updates' widths, so no ratio moves and nothing is clipped."""
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO_ROOT / "sft_data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8", "--per_device_mini_train_batch_size", "2",
        "--gradient_accumulation_steps", "4", "--ppo_epochs", "1", "--max_steps", "2", "--logging_steps", "1",
        "--max_response_length", "32", "--save_steps", "100", "--disable_tqdm", "true",
        "--old_logprobs", "forward", "--bf16", "--torch_dtype", "bfloat16", "--report_to", "none",
    ]  # fmt: skip
    run([*ACCELERATE, "run_ppo_with_peft.py", *argv], REPO_ROOT)
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert all(r["policy/approxkl"] == 0.0 and r["policy/clipfrac"] == 0.0 for r in rows), rows


def test_ppo_save_and_resume_continues_the_step_count(tiny_llama, rm_adapter, tmp_path):
    out = tmp_path / "ppo"
    argv = in_precision(resume_argv(tiny_llama, rm_adapter, out), "fp16")
    first = with_flags(argv, max_steps="2", save_steps="2", logging_steps="1")
    run([*ACCELERATE, "run_ppo_with_peft.py", *first], REPO_ROOT)
    assert (out / "checkpoint-2").is_dir()
    resumed = with_flags(argv, max_steps="4", save_steps="2", logging_steps="1")
    resumed += ["--resume_from_checkpoint", str(out / "checkpoint-2")]
    run([*ACCELERATE, "run_ppo_with_peft.py", *resumed], REPO_ROOT)
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoint-4").is_dir()
    assert_finite_trained_adapter(out / "adapter_model.safetensors")


def test_solver_evaluate_world_size_1_on_a_split_model(tiny_model_factory, tmp_path):
    pytest.importorskip("fairscale")
    from test_tp_solver_evaluate import ROWS, read_outputs, write_rows

    import checkpoint_split

    model_dir = tiny_model_factory("qwen2")
    checkpoint_split.main(
        ["--ckpt_file", str(model_dir), "--save_path", str(tmp_path / "shards"), "--n", "1"]
    )
    data = write_rows(tmp_path / "test.jsonl")
    command = [*torchrun(1), "-m", "rlhf.tp.solver_evaluate", "--task", "GSM8K"]
    command += ["--ckpt_dir", str(tmp_path / "shards"), "--log_dir", str(tmp_path / "log")]
    command += ["--label_file", str(data), "--model_type", "qwen2", "--max_batch_size", "2"]
    command += ["--max_gen_len", "10", "--stop", "Question:"]
    run(command, REPO_ROOT)
    predictions, metrics = read_outputs(tmp_path / "log")
    assert [p["question"] for p in predictions] == [r["question"] for r in ROWS]
    assert metrics["tensor_parallel"] == 1 and metrics["n"] == 3
    assert metrics["accuracy"] == sum(p["correct"] for p in predictions) / 3


def test_tp_full_training_in_bf16_steps_float32_masters(tiny_llama, tmp_path):
    """``--lora_rank -1`` on a GPU trains the bf16 shards (``--dtype auto``) through float32 master copies in
    AdamW: the log says so, the checkpoint's optimizer state holds them, and the loss goes down."""
    pytest.importorskip("fairscale")
    from test_tp_train import addition_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(24))
    command = [
        *torchrun(1),
        "-m",
        "rlhf.tp.solver_train",
        "--ckpt_dir",
        str(tiny_llama),
        "--model_type",
        "llama",
    ]
    command += ["--train_file", str(data), "--save_dir", str(tmp_path / "full"), "--lora_rank", "-1"]
    command += ["--max_batch_size", "8", "--max_seq_len", "64", "--lr", "3e-3", "--epochs", "4"]
    command += ["--save_steps", "4", "--log_steps", "2"]
    proc = run(command, REPO_ROOT)
    assert "float32 master copies" in proc.stderr and "bfloat16" in proc.stderr
    state = torch.load(
        next((tmp_path / "full_run").glob("checkpoint-*/rank_0/optimizer.pt")), weights_only=True
    )
    masters = [s["master"] for s in state["optimizers"]["model"]["state"].values() if "master" in s]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    log = [json.loads(x) for x in (tmp_path / "full/training/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in log) and log[-1]["loss"] < log[0]["loss"]
