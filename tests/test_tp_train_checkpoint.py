"""Checkpoints of solver_train / verifier_train (rlhf/tp/train_checkpoint.py): every --save_steps and on
Ctrl-C / SIGTERM, and a re-run of the command resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tp_train import addition_rows, write_jsonl
from test_tp_train import world_of_one as world_of_one  # the fixture

from rlhf.tp import solver_train, training


def argv(model: Path, data: Path, save_dir: Path, *extra: str) -> list[str]:
    return [
        "--ckpt_dir", str(model), "--train_file", str(data), "--model_type", "llama", "--save_dir", str(save_dir),
        "--max_batch_size", "8", "--max_seq_len", "64", "--log_steps", "1", "--lora_rank", "4",
        "--lora_dropout", "0.1", "--lr", "1e-2", "--accumulation_steps", "2", "--max_steps", "6",
        "--eval_ratio", "0", *extra,
    ]  # fmt: skip


def rows_without_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes_bit_identically(
    tiny_llama, tmp_path, world_of_one, monkeypatch, capsys
):
    """20 rows in micro-batches of 8 (3 per epoch), 2 per optimizer step, so steps straddle epochs; LoRA
    dropout draws from the RNG. Ctrl-C during the 3rd micro-batch: step 2 finishes (it ends with the first
    micro-batch of the second epoch), checkpoint-2 is saved, the command exits 130; re-running it goes on
    inside that epoch and ends with the same adapter, shards and metrics as a run that was never stopped."""
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(20))
    full = solver_train.main(argv(tiny_llama, data, tmp_path / "full"))
    assert full["steps"] == 6 and not (tmp_path / "full_run").exists()  # --save_steps 500: no checkpoint

    calls = {"n": 0}
    collate = training.collate

    def signalling_collate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return collate(*args, **kwargs)

    monkeypatch.setattr(training, "collate", signalling_collate)
    out = tmp_path / "parts"
    with pytest.raises(SystemExit) as stopped:
        solver_train.main(argv(tiny_llama, data, out))
    assert stopped.value.code == 130
    run_dir = tmp_path / "parts_run"
    assert f"stopped by SIGINT after optimizer step 2; checkpoint saved to {run_dir / 'checkpoint-2'}" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # no trained model for an unfinished run
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["step"], state["micro"], state["epoch"], state["done_in_epoch"]) == (2, 4, 1, 1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(training, "collate", collate)
    again = solver_train.main(argv(tiny_llama, data, out))  # the same command
    assert f"resuming from {run_dir / 'checkpoint-2'}" in capsys.readouterr().err
    assert again["first_loss"] == full["first_loss"] and again["final_loss"] == full["final_loss"]
    for name in ("adapter/adapter.00.safetensors", "consolidated.00.pth"):
        load = load_file if name.endswith(".safetensors") else lambda p: torch.load(p, weights_only=True)
        a, b = load(str(tmp_path / "full" / name)), load(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    metrics = "training/metrics.jsonl"
    assert rows_without_timing(out / metrics) == rows_without_timing(tmp_path / "full" / metrics)


def test_save_steps_keeps_the_newest_and_overwrite_starts_afresh(tiny_llama, tmp_path, world_of_one, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(20))
    run_dir = tmp_path / "run"
    flags = ["--save_steps", "2", "--save_total_limit", "1", "--output_dir", str(run_dir)]
    solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4"]  # not at the last step (6)
    files = {p.relative_to(run_dir / "checkpoint-4").as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert files == {
        "trainer_state.json", "rank_0/trainable.safetensors", "rank_0/optimizer.pt", "rank_0/rng.pt",
        "rank_0/state.json",
    }  # fmt: skip
    capsys.readouterr()
    solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags, "--overwrite_output_dir"))
    err = capsys.readouterr().err
    assert "starting afresh" in err and "resuming" not in err

    with pytest.raises(SystemExit) as failed:  # another LoRA rank: the checkpoint does not fit
        solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags, "--lora_rank", "8"))
    assert failed.value.code == 2
    assert "its trainable tensors do not fit this model and flags" in capsys.readouterr().err
