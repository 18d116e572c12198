"""Checkpoints of solver_train / verifier_train (rlhf/tp/train_checkpoint.py): every --save_steps and on
Ctrl-C / SIGTERM, and a re-run of the command resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file
from test_tp_train import addition_rows, write_jsonl

from rlhf.tp import solver_train, training

REPO = Path(__file__).resolve().parents[1]


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
    assert full["steps"] == 6 and [p.name for p in (tmp_path / "full_run").iterdir()] == ["checkpoint-6"]

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

    resumed_batches = []

    def counting_collate(*args, **kwargs):
        resumed_batches.append(args[0])
        return collate(*args, **kwargs)

    monkeypatch.setattr(training, "collate", counting_collate)
    again = solver_train.main(argv(tiny_llama, data, out))  # the same command
    assert f"resuming from {run_dir / 'checkpoint-2'}" in capsys.readouterr().err
    assert len(resumed_batches) == 12 - 4  # the micro-batches after step 2's four, not a restart
    monkeypatch.setattr(training, "collate", collate)
    assert again["first_loss"] == full["first_loss"] and again["final_loss"] == full["final_loss"]
    for name in ("adapter/adapter.00.safetensors", "consolidated.00.pth"):
        load = load_file if name.endswith(".safetensors") else lambda p: torch.load(p, weights_only=True)
        a, b = load(str(tmp_path / "full" / name)), load(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    metrics = "training/metrics.jsonl"
    assert rows_without_timing(out / metrics) == rows_without_timing(tmp_path / "full" / metrics)

    adapter = load_file(str(out / "adapter/adapter.00.safetensors"))
    finished = solver_train.main(argv(tiny_llama, data, out))  # a finished command again: nothing to train
    assert f"resuming from {run_dir / 'checkpoint-6'}" in capsys.readouterr().err
    assert finished["final_loss"] == full["final_loss"] and finished["steps"] == 6
    again = load_file(str(out / "adapter/adapter.00.safetensors"))
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)
    assert rows_without_timing(out / metrics) == rows_without_timing(tmp_path / "full" / metrics)


def test_save_steps_keeps_the_newest_and_overwrite_starts_afresh(
    tiny_llama, tmp_path, world_of_one, capsys, monkeypatch
):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(20))
    run_dir = tmp_path / "run"
    flags = ["--save_steps", "2", "--save_total_limit", "1", "--output_dir", str(run_dir)]
    solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-6"]  # 2, 4 and the last step; keep 1
    files = {p.relative_to(run_dir / "checkpoint-6").as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert files == {
        "trainer_state.json", "rank_0/trainable.safetensors", "rank_0/optimizer.pt", "rank_0/rng.pt",
        "rank_0/state.json",
    }  # fmt: skip
    capsys.readouterr()
    solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags, "--overwrite_output_dir"))
    err = capsys.readouterr().err
    assert "starting afresh" in err and "resuming" not in err

    # a resume with other settings is refused before the model loads
    monkeypatch.setattr(training, "build_model_for_training", lambda *a: pytest.fail("model loaded first"))
    for other, said in ((["--lora_rank", "8"], "--lora_rank 4 there, 8 now"),
                        (["--max_batch_size", "4"], "--max_batch_size 8 there, 4 now")):  # fmt: skip
        with pytest.raises(SystemExit) as failed:  # the position in the data would mean something else
            solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags, *other))
        err = capsys.readouterr().err
        assert failed.value.code == 2 and f"was written by a run with other settings ({said})" in err
    write_jsonl(data, addition_rows(21))
    with pytest.raises(SystemExit):
        solver_train.main(argv(tiny_llama, data, tmp_path / "model", *flags))
    assert "(the files of --train_file changed)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        solver_train.main(
            argv(tiny_llama, data, tmp_path / "model", "--output_dir", str(tmp_path / "model" / "c"))
        )
    assert "is inside --save_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_at_tp2_one_signalled_rank_stops_both_and_the_rerun_matches(tiny_llama, tmp_path):
    """torchrun, TP=2 (gloo): Ctrl-C reaches rank 1 only; both ranks stop after step 2, each writes its
    slice into checkpoint-2; the re-run resumes and ends with the shards of a run never stopped."""
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(20))

    def launch(save_dir: Path, signal_rank_1: bool) -> subprocess.CompletedProcess:
        command = [*torchrun(2), __file__, str(tiny_llama), str(data), str(save_dir)]
        env = script_env(SIGNAL_RANK_1="1" if signal_rank_1 else "0")
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    full = launch(tmp_path / "full", signal_rank_1=False)
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = launch(tmp_path / "parts", signal_rank_1=True)
    assert stopped.returncode != 0 and stopped.stderr.count("SIGINT received") == 1, stopped.stderr[-3000:]
    assert stopped.stderr.count("stopped by SIGINT after optimizer step 2") == 1  # rank 0 says it for the job
    checkpoint = tmp_path / "parts_run" / "checkpoint-2"
    assert all((checkpoint / f"rank_{r}" / "trainable.safetensors").is_file() for r in (0, 1))
    resumed = launch(tmp_path / "parts", signal_rank_1=False)
    assert resumed.returncode == 0 and f"resuming from {checkpoint}" in resumed.stderr, resumed.stderr[-3000:]
    for shard in ("adapter/adapter.00.safetensors", "adapter/adapter.01.safetensors"):
        a, b = load_file(str(tmp_path / "full" / shard)), load_file(str(tmp_path / "parts" / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard


def worker(model: str, data: str, save_dir: str) -> None:
    """torchrun entry of the TP=2 test: solver_train, with Ctrl-C sent to rank 1 in its 3rd micro-batch
    when SIGNAL_RANK_1=1."""
    if os.environ.get("SIGNAL_RANK_1") == "1" and os.environ["RANK"] == "1":
        collate, calls = training.collate, {"n": 0}

        def signalling_collate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return collate(*args, **kwargs)

        training.collate = signalling_collate
    solver_train.main(argv(Path(model), Path(data), Path(save_dir)))


if __name__ == "__main__":
    worker(*sys.argv[1:4])
