"""Ctrl-C / SIGTERM during training: a checkpoint after the step in flight, exit 128 + signal, and the same
command resumes from it (rlhf/interruption.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file
from test_sft_stage import quick_argv

import run_ppo_with_peft
import run_sft_with_peft
from rlhf.interruption import StopSignals, TrainingInterrupted, rerun_resumes
from rlhf.sft.stage import SFTTrainer

REPO = Path(__file__).resolve().parents[1]


def test_first_signal_is_recorded_a_second_ctrl_c_acts_as_usual_and_sigterms_repeat_harmlessly():
    # Python's own Ctrl-C handler, also where the suite runs in the background (a shell ignores SIGINT there)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _first_signal_then_usual(signal.getsignal(signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, inherited)


def _first_signal_then_usual(before) -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        assert stop.agreed(torch.device("cpu")) == signal.SIGTERM  # one process: its own signal
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's and torchrun's: still stopping, not killed
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C's own handler is back: it now stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with StopSignals() as stop:
        assert stop.received is None and stop.agreed(torch.device("cpu")) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_interrupted_message_and_exit_code():
    stopped = TrainingInterrupted(signal.SIGINT, 3, "runs/ppo/checkpoint-3")
    assert stopped.exit_code == 130 and TrainingInterrupted(signal.SIGTERM, 3, None).exit_code == 143
    assert str(stopped) == (
        "stopped by SIGINT after optimizer step 3; checkpoint saved to runs/ppo/checkpoint-3. "
        "Run the same command again to resume from it."
    )
    # a command that starts afresh or names another checkpoint would not resume from this one
    assert rerun_resumes(False, None) and rerun_resumes(False, "True")
    assert not rerun_resumes(True, None) and not rerun_resumes(False, "runs/ppo/checkpoint-1")
    assert str(
        TrainingInterrupted(signal.SIGINT, 3, "out/checkpoint-3", same_command_resumes=False)
    ).endswith("To resume from it, run the command with --resume_from_checkpoint out/checkpoint-3.")
    assert str(TrainingInterrupted(signal.SIGTERM, 3, None)).endswith("no checkpoint was saved.")


SIGNALLING_REWARD = '''
import os, signal
from pathlib import Path

from rlhf.toy_task import positivity_reward

calls = 0


def reward(prompts, responses):
    """positivity_reward; at its second call, unless the marker file exists, Ctrl-C (SIGINT) to itself."""
    global calls
    calls += 1
    marker = Path(os.environ["STOP_MARKER"])
    if calls == 2 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGINT)
    return positivity_reward(prompts, responses)
'''


def ppo_argv(model: Path, reward_file: Path, out: Path) -> list[str]:
    return [
        "--sft_model_path", str(model), "--reward_fn", f"{reward_file}:reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_mini_train_batch_size", "2", "--max_response_length", "6", "--logging_steps", "1",
        "--save_steps", "100", "--max_steps", "6", "--lr_scheduler_type", "constant", "--disable_tqdm", "true",
        "--actor_lora_target", "q_proj,v_proj", "--critic_lora_target", "q_proj,v_proj", "--seed", "5",
    ]  # fmt: skip


def test_ppo_stops_on_ctrl_c_with_a_checkpoint_and_the_same_command_resumes_bit_identically(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    """The signal arrives while the second rollout is scored (a rollout = 2 optimizer steps): the loop
    finishes step 3, saves checkpoint-3 (mid-rollout), exits 130 without the final model; re-running the
    command resumes there and ends bit-identical to a run that was never interrupted."""
    reward_file = tmp_path / "signalling_reward.py"
    reward_file.write_text(SIGNALLING_REWARD)
    marker = tmp_path / "signalled"
    monkeypatch.setenv("STOP_MARKER", str(marker))
    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stopped:
        run_ppo_with_peft.main(ppo_argv(tiny_llama, reward_file, out))
    assert stopped.value.code == 130 and marker.exists()
    err = capsys.readouterr().err
    assert "SIGINT received: finishing the current optimizer step" in err
    assert f"stopped by SIGINT after optimizer step 3; checkpoint saved to {out / 'checkpoint-3'}" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "rank_0" / "buffer.safetensors").is_file()  # inside the second rollout
    assert not (out / "adapter_model.safetensors").exists()  # no final model for an unfinished run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resumed = run_ppo_with_peft.main(ppo_argv(tiny_llama, reward_file, out))  # the same command
    assert f"resuming from {out / 'checkpoint-3'}" in capsys.readouterr().err
    assert resumed["step"] == 6
    full = tmp_path / "full"
    run_ppo_with_peft.main(ppo_argv(tiny_llama, reward_file, full))  # the marker exists: no signal
    for name in (
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "critic/value_head.safetensors",
    ):
        a, b = load_file(full / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def signal_at_training_step(monkeypatch, n: int, signum: int) -> Callable[[], None]:
    """Make the ``n``-th call of SFTTrainer.training_step send ``signum`` to this process; returns the undo."""
    calls = {"n": 0}
    training_step = SFTTrainer.training_step

    def signalling_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", signalling_step)
    return lambda: monkeypatch.setattr(SFTTrainer, "training_step", training_step)


def test_sft_stops_on_sigterm_with_a_checkpoint_and_the_same_command_resumes(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sft"
    argv = quick_argv(tiny_llama, REPO / "sft_data", out, "--lora_rank", "4")
    argv[argv.index("--max_steps") + 1] = "5"
    undo = signal_at_training_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        run_sft_with_peft.main(argv)  # --save_strategy no: the signal still saves a checkpoint
    assert stopped.value.code == 143
    assert f"stopped by SIGTERM after optimizer step 2; checkpoint saved to {out / 'checkpoint-2'}" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "train_results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    undo()
    run_sft_with_peft.main(argv)  # the same command: resumes from checkpoint-2
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and (out / "adapter_model.safetensors").is_file()
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4, 5]


def test_sft_stop_under_best_model_tracking_keeps_its_checkpoint_and_runs_no_evaluation(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    """--load_best_model_at_end with --save_total_limit 1 (the Trainer deletes all but the best checkpoint
    at the end of train) and --save_strategy best (an evaluation decides whether to save), evaluation
    every step, 2 micro-batches per step, --overwrite_output_dir: the signal in step 3's second micro-batch
    saves checkpoint-3, which stays; no evaluation runs at step 3; the message names
    --resume_from_checkpoint, since the same command would start afresh."""
    out = tmp_path / "best"
    argv = quick_argv(tiny_llama, REPO / "sft_data", out, "--lora_rank", "4", "--overwrite_output_dir")
    argv[argv.index("--max_steps") + 1] = "8"
    argv[argv.index("--split_ratio") + 1] = "0.2"
    argv[argv.index("--save_strategy") + 1] = "best"
    argv += ["--eval_strategy", "steps", "--eval_steps", "1", "--load_best_model_at_end", "true",
             "--metric_for_best_model", "eval_loss", "--save_total_limit", "1", "--gradient_accumulation_steps", "2",
             "--per_device_eval_batch_size", "8"]  # fmt: skip
    signal_at_training_step(monkeypatch, 6, signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run_sft_with_peft.main(argv)
    assert stopped.value.code == 130
    checkpoint = out / "checkpoint-3"
    assert (
        f"checkpoint saved to {checkpoint}. To resume from it, run the command with --resume_from_checkpoint "
        f"{checkpoint}." in capsys.readouterr().err
    )
    assert checkpoint.is_dir() and not (out / "adapter_model.safetensors").exists()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert [row["step"] for row in saved["log_history"] if "eval_loss" in row] == [
        1,
        2,
    ]  # none at the stop step
    # the best checkpoint as saved, which a resume reads: it named the staging dir (.checkpoint-N.tmp/...),
    # and the resumed Trainer dropped it ("does not exist anymore") and ended on a model that was not the best
    best = saved["best_model_checkpoint"]
    assert best and ".tmp" not in best and Path(best).parent == out and Path(best).is_dir()
    assert json.loads((Path(best) / "trainer_state.json").read_text())["best_model_checkpoint"] == best

    run_sft_with_peft.main([*argv, "--resume_from_checkpoint", str(checkpoint)])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8


def test_a_run_killed_after_its_last_step_saves_that_step_and_trains_no_more(tiny_llama, tmp_path, capsys):
    """A kill during the final save or evaluation left checkpoint-N of the last step and no finished-run
    record; the same command then resumed from it and the Trainer trained step N+1 past --max_steps (it
    checks the limit after a step), saving another model."""
    out = tmp_path / "last"
    argv = quick_argv(
        tiny_llama, REPO / "sft_data", out, "--lora_rank", "4", "--lr_scheduler_type", "constant"
    )
    argv[argv.index("--max_steps") + 1] = "3"
    argv[argv.index("--save_strategy") + 1] = "steps"
    argv += ["--save_steps", "3"]
    run_sft_with_peft.main(argv)
    expected = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    for name in ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()  # as a kill during the final save leaves it
    capsys.readouterr()
    run_sft_with_peft.main(argv)
    assert "holds the run's last step (3): nothing left to train" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    final = load_file(out / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_is_signalled(tiny_llama, tmp_path):
    """torchrun, 2 processes (gloo): only rank 1 gets SIGINT; both agree on step 3, rank 0 writes the shared
    files, each rank its own state, and both exit 130 (torchrun reports the failure)."""
    reward_file = tmp_path / "signalling_reward.py"
    reward_file.write_text(SIGNALLING_REWARD.replace("not marker.exists()", 'os.environ["RANK"] == "1"'))
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [*torchrun(2), "run_ppo_with_peft.py", *ppo_argv(tiny_llama, reward_file, out)], cwd=REPO,
        env=script_env(STOP_MARKER=str(tmp_path / "unused")), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("SIGINT received") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGINT after optimizer step 3; checkpoint saved to") == 1  # rank 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert all((out / "checkpoint-3" / f"rank_{r}" / "buffer.safetensors").is_file() for r in (0, 1))
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_to_torchrun_reaches_its_workers_and_they_save(tiny_llama, tmp_path):
    """Ctrl-C as a terminal sends it, to torchrun: torchrun forwards SIGINT to its workers (in sessions of
    their own) and waits --shutdown_timeout before killing them; they finish the step and save."""
    reward_file = tmp_path / "reward.py"
    reward_file.write_text("from rlhf.toy_task import positivity_reward as reward\n")
    out = tmp_path / "ddp"
    argv = ppo_argv(tiny_llama, reward_file, out)
    argv[argv.index("--max_steps") + 1] = "100000"
    proc = subprocess.Popen(
        [*torchrun(2), "run_ppo_with_peft.py", *argv], cwd=REPO, env=script_env(), stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # two steps done
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert err.count("SIGINT received: finishing the current optimizer step") == 2, err[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and err.count(f"checkpoint saved to {checkpoints[0]}") == 1  # once per job
    assert all((checkpoints[0] / f"rank_{r}" / "state.json").is_file() for r in (0, 1))
    assert not (out / "adapter_model.safetensors").exists()


SFT_WORKER = """
import os, signal, sys
sys.path.insert(0, os.path.join({repo!r}, "tests"))
import run_sft_with_peft
from rlhf.sft.stage import SFTTrainer

training_step, calls = SFTTrainer.training_step, [0]


def signalling_step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return training_step(self, *args, **kwargs)


SFTTrainer.training_step = signalling_step
run_sft_with_peft.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sft_under_torchrun_one_signalled_process_stops_both(tiny_llama, tmp_path):
    """Two SFT processes (torchrun, gloo): SIGTERM reaches rank 1 only, in step 2; the Trainer callbacks of
    both agree, both save into checkpoint-2 and stop there."""
    worker = tmp_path / "sft_worker.py"
    worker.write_text(SFT_WORKER.format(repo=str(REPO)))
    out = tmp_path / "sft"
    argv = quick_argv(tiny_llama, REPO / "sft_data", out, "--lora_rank", "4")
    argv[argv.index("--per_device_train_batch_size") + 1] = "4"
    proc = subprocess.run(
        [*torchrun(2), str(worker), *argv], cwd=REPO, env=script_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("SIGTERM received") == 1, proc.stderr[-3000:]
    assert (
        proc.stderr.count(
            f"stopped by SIGTERM after optimizer step 2; checkpoint saved to {out / 'checkpoint-2'}"
        )
        == 1  # rank 0 says it for the job
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()


CHILD = """
import sys, time
from pathlib import Path
from rlhf.interruption import StopSignals
with StopSignals() as stop:
    Path(sys.argv[1]).write_text("ready")
    deadline = time.monotonic() + 60
    while stop.received is None and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(sys.argv[1]).write_text(str(stop.received))
"""
LAUNCHER = """
import os, subprocess, sys
env = dict(os.environ, ACCELERATE_USE_CPU="True")
env.pop("TORCHELASTIC_RUN_ID", None)
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env).wait()
"""


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_training_process_stops_and_saves_when_accelerates_one_process_launcher_is_killed(tmp_path):
    """`accelerate launch` with one process runs the script as a plain child and does not forward signals:
    a SIGTERM to the launcher ends it at once. The child asked for a SIGTERM on its parent's death, so it
    stops as on its own SIGTERM (checkpoint, exit 143) instead of training on as an orphan."""
    flag = tmp_path / "child_state"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(flag)], env=script_env())
    deadline = time.monotonic() + 60
    while not (flag.exists() and flag.read_text() == "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # Python's default: the launcher dies, its child is not signalled
    launcher.wait(timeout=30)
    while flag.read_text() == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.read_text() == str(int(signal.SIGTERM))
