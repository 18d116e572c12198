"""SFT output handling: the non-finite loss guard, damaged checkpoints, bad output/batch flags, seeding.

The guard and checkpoint code lives in ``rlhf/training`` and serves the reward model too.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sft_stage import quick_argv
from transformers import TrainingArguments

from rlhf.args import LoraArguments, ModelArguments
from rlhf.checkpoint_dirs import list_checkpoints
from rlhf.errors import CheckpointError
from rlhf.sft.stage import SFTTrainer, build_sft_model
from rlhf.training import prepare_output_dir
from rlhf.training.checkpoints import checkpoint_problem, newest_loadable_checkpoint
from run_sft_with_peft import main


def with_flags(argv: list[str], **flags: str) -> list[str]:
    """``argv`` with each ``--flag value`` replaced (or appended when absent)."""
    argv = list(argv)
    for flag, value in flags.items():
        if f"--{flag}" in argv:
            argv[argv.index(f"--{flag}") + 1] = value
        else:
            argv += [f"--{flag}", value]
    return argv


def checkpointed_argv(model: Path, data: Path, out: Path, max_steps: int) -> list[str]:
    argv = quick_argv(model, data, out, "--lora_rank", "4")
    return with_flags(argv, save_strategy="steps", save_steps="2", max_steps=str(max_steps))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def user_error_line(script_main, argv: list[str], capsys) -> str:
    """Run ``script_main(argv)``; assert exit code 2 and return its one ``error:`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        script_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def run_expecting_user_error(argv: list[str], capsys) -> str:
    """Run the SFT script's ``main``; assert exit code 2 and return its one ``error:`` line."""
    return user_error_line(main, argv, capsys)


def logged_steps(out: Path) -> list[int]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["step"] for row in state["log_history"] if "loss" in row]


# --- non-finite loss -----------------------------------------------------------------------------


def test_non_finite_loss_stops_keeps_checkpoints_and_the_earlier_final_model(
    tiny_llama, repo_root, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "nan"
    main(checkpointed_argv(tiny_llama, repo_root / "sft_data", out, max_steps=4))
    good_final = (out / "adapter_model.safetensors").read_bytes()
    good_state = (out / "trainer_state.json").read_text()

    original = SFTTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 6 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    capsys.readouterr()
    line = run_expecting_user_error(
        checkpointed_argv(tiny_llama, repo_root / "sft_data", out, max_steps=8), capsys
    )
    assert line == (
        "error: non-finite training loss (nan) at step 7; stopped before its update and did not save the "
        f"final model. Last good checkpoint: {out / 'checkpoint-6'}"
    )
    assert (out / "adapter_model.safetensors").read_bytes() == good_final
    assert (out / "trainer_state.json").read_text() == good_state
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
    assert checkpoint_problem(out / "checkpoint-6") is None  # finite weights, loads
    assert not list(out.glob(".*.tmp"))


# --- damaged checkpoints -------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, weight: float = 1.0) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), weight)}, ckpt / "adapter_model.safetensors")
    torch.save(
        {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 0.1}]}, ckpt / "optimizer.pt"
    )
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors is truncated"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda c: truncate(c / "scheduler.pt"), "scheduler.pt is truncated"),
        (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
        (
            lambda c: save_file({"w": torch.full((2,), float("nan"))}, c / "adapter_model.safetensors"),
            "adapter_model.safetensors holds non-finite weights (w)",
        ),
    ],
)
def test_checkpoint_problem_names_the_damaged_file(tmp_path, damage, expected):
    good = fake_checkpoint(tmp_path, 2)
    bad = fake_checkpoint(tmp_path, 4)
    damage(bad)
    assert checkpoint_problem(good) is None
    problem = checkpoint_problem(bad)
    assert problem.startswith(expected) and "\n" not in problem
    assert newest_loadable_checkpoint(tmp_path) == (good, [f"checkpoint-4: {problem}"])


def test_checkpoints_are_listed_newest_first_by_step_number(tmp_path):
    for step in (2, 10, 9):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ".checkpoint-11.tmp").mkdir()  # a staging folder is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-9", "checkpoint-2"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_resume_true_takes_the_newest_checkpoint_that_loads(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    truncate(fake_checkpoint(tmp_path, 4) / "scheduler.pt")
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="True", report_to="none")
    assert prepare_output_dir(args, overwrite=False) == str(good)
    truncate(good / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"--resume_from_checkpoint True: no loadable checkpoint-N in .*"
                       r"checkpoint-4: scheduler\.pt is truncated.*checkpoint-2: adapter_model"):  # fmt: skip
        prepare_output_dir(args, overwrite=False)


def test_implicit_resume_skips_a_truncated_checkpoint_and_explicit_resume_names_the_file(
    tiny_llama, repo_root, tmp_path, capsys
):
    out = tmp_path / "resume"
    main(checkpointed_argv(tiny_llama, repo_root / "sft_data", out, max_steps=4))
    truncate(out / "checkpoint-4" / "optimizer.pt")
    capsys.readouterr()
    main(checkpointed_argv(tiny_llama, repo_root / "sft_data", out, max_steps=6))
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoint-4'}: optimizer.pt is truncated or corrupt" in err
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # steps 1-2 from checkpoint-2, then 3-6 again
    assert checkpoint_problem(out / "checkpoint-4") is None  # re-saved over the damaged one

    truncate(out / "checkpoint-6" / "adapter_model.safetensors")
    argv = checkpointed_argv(tiny_llama, repo_root / "sft_data", out, max_steps=8)
    line = run_expecting_user_error([*argv, "--resume_from_checkpoint", str(out / "checkpoint-6")], capsys)
    assert line.startswith(
        f"error: --resume_from_checkpoint {out / 'checkpoint-6'}: adapter_model.safetensors is truncated"
    )
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6  # nothing trained


def test_implicit_resume_with_no_loadable_checkpoint_is_one_line(tiny_llama, repo_root, tmp_path, capsys):
    out = tmp_path / "broken"
    fake_checkpoint(out, 2)
    truncate(out / "checkpoint-2" / "optimizer.pt")
    line = run_expecting_user_error(checkpointed_argv(tiny_llama, repo_root / "sft_data", out, 4), capsys)
    assert line.startswith(f"error: --output_dir {out}: no checkpoint-N loads (checkpoint-2: optimizer.pt")
    assert line.endswith("pass --overwrite_output_dir to start afresh")


# --- flags checked up front ----------------------------------------------------------------------


def test_a_final_save_without_weights_is_one_line_not_a_published_empty_model(
    tiny_llama, repo_root, tmp_path, monkeypatch, capsys
):
    """As a ZeRO-3 config that does not gather the weights on save leaves it: config.json only."""
    out = tmp_path / "sft"

    def save_without_weights(self, output_dir=None, _internal_call=False):
        self.model.config.save_pretrained(output_dir)

    monkeypatch.setattr(SFTTrainer, "save_model", save_without_weights)
    line = run_expecting_user_error(quick_argv(tiny_llama, repo_root / "sft_data", out), capsys)
    assert line.startswith("error: the final save wrote no weights into") and "ZeRO-3" in line
    assert not (out / "config.json").exists()


def test_a_killed_overwrite_run_resumes_not_mistaken_for_the_finished_run_before_it(
    tiny_llama, repo_root, tmp_path, monkeypatch
):
    """--overwrite_output_dir used to leave the earlier run's trainer_state.json: the new run, stopped
    after its first checkpoint, could then never be resumed ("already holds a finished run")."""
    from test_interruption import signal_at_training_step

    out = tmp_path / "sft"
    argv = checkpointed_argv(tiny_llama, repo_root / "sft_data", out, 4)
    main(argv)
    undo = signal_at_training_step(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite_output_dir"])
    undo()
    assert not (out / "trainer_state.json").exists() and (out / "checkpoint-3").is_dir()
    main(argv)  # the same command resumes the stopped run
    assert logged_steps(out) == [1, 2, 3, 4] and (out / "trainer_state.json").is_file()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"per_device_train_batch_size": "0"}, "error: --per_device_train_batch_size must be a positive"),
        ({"per_device_train_batch_size": "-1"}, "error: --per_device_train_batch_size must be a positive"),
        ({"per_device_eval_batch_size": "0"}, "error: --per_device_eval_batch_size must be a positive"),
        ({"gradient_accumulation_steps": "0"}, "error: --gradient_accumulation_steps must be a positive"),
    ],
)
def test_non_positive_batch_flags_fail_before_anything_runs(
    tiny_llama, repo_root, tmp_path, capsys, flags, expected
):
    out = tmp_path / "out"
    line = run_expecting_user_error(
        with_flags(quick_argv(tiny_llama, repo_root / "sft_data", out), **flags), capsys
    )
    assert line.startswith(expected)
    assert not out.exists()


def test_output_dir_that_is_a_file_is_one_line(tiny_llama, repo_root, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    line = run_expecting_user_error(quick_argv(tiny_llama, repo_root / "sft_data", out), capsys)
    assert line == f"error: --output_dir {out} is a file, not a directory"
    assert out.read_text() == "keep me"


# --- seeding -------------------------------------------------------------------------------------


def test_same_seed_builds_the_same_fresh_adapter(tiny_llama, tmp_path):
    def adapter(seed: int) -> dict[str, torch.Tensor]:
        args = TrainingArguments(output_dir=str(tmp_path), seed=seed, report_to="none")
        model = build_sft_model(
            ModelArguments(model_name_or_path=str(tiny_llama)), LoraArguments(lora_rank=4), args
        )
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}

    first, again, other = adapter(7), adapter(7), adapter(8)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_two_runs_with_the_same_seed_save_the_same_adapter(tiny_llama, repo_root, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        main(
            with_flags(
                quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "4"),
                max_steps="1",
                seed="3",
            )
        )
    first, second = (load_file(out / "adapter_model.safetensors") for out in outs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
