"""Resuming the Trainer-based stages (SFT, reward model) safely: incomplete checkpoints are skipped, a
finished run is not trained again, and a resume with other batch/adapter/data settings is refused.

The code is in ``rlhf/training/checkpoints.py``, ``outputs.py``, ``resume_settings.py`` and ``runner.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import save_file
from test_interruption import signal_at_training_step
from test_reward_stage import quick_argv as rm_quick_argv
from test_sft_outputs import logged_steps as trained_steps
from test_sft_outputs import user_error_line as error_line
from test_sft_outputs import with_flags
from test_sft_stage import quick_argv
from transformers import TrainingArguments

import run_rm_with_peft
import run_sft_with_peft
from rlhf.errors import CheckpointError
from rlhf.training import prepare_output_dir
from rlhf.training.checkpoints import (
    ANY_LAYOUT,
    CheckpointLayout,
    checkpoint_problem,
    layout_of,
    newest_loadable_checkpoint,
)
from rlhf.training.resume_settings import (
    SETTINGS_FILE,
    check_resume_settings,
    differences,
    inputs_settings,
    read_settings,
)

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "sft_data"


def sft_argv(model: Path, out: Path, max_steps: int, **flags: str) -> list[str]:
    """LoRA rank 4, a checkpoint every 2 steps, ``max_steps`` steps."""
    argv = quick_argv(model, SFT_DATA, out, "--lora_rank", "4")
    return with_flags(
        argv, **{"save_strategy": "steps", "save_steps": "2", "max_steps": str(max_steps), **flags}
    )


def checkpoints(out: Path) -> list[str]:
    """The checkpoint-N dir names of ``out``, oldest first."""
    from rlhf.checkpoint_dirs import list_checkpoints

    return [p.name for p in list_checkpoints(out)[::-1]]


# --- 1. incomplete checkpoints --------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, ckpt / "adapter_model.safetensors")
    torch.save({"state": {}, "param_groups": [{"lr": 0.1}]}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        (["optimizer.pt"], "incomplete: optimizer.pt is missing"),
        (["scheduler.pt"], "incomplete: scheduler.pt is missing"),
        (["trainer_state.json"], "incomplete: trainer_state.json is missing"),
        (
            ["adapter_model.safetensors"],
            "incomplete: the weights (adapter_model.safetensors, model.safetensors",
        ),
        (
            ["optimizer.pt", "scheduler.pt"],
            "incomplete: optimizer.pt, scheduler.pt are missing",
        ),
    ],
)
def test_a_checkpoint_missing_a_file_it_needs_is_skipped_naming_the_file(tmp_path, remove, expected):
    good = fake_checkpoint(tmp_path, 2)
    bad = fake_checkpoint(tmp_path, 4)
    for name in remove:
        (bad / name).unlink()
    (tmp_path / "checkpoint-999").mkdir()  # an empty one, newest of all
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(bad).startswith(expected)
    found, skipped = newest_loadable_checkpoint(tmp_path)
    assert found == good
    assert skipped[0].startswith("checkpoint-999: incomplete: trainer_state.json, optimizer.pt, scheduler.pt")
    assert skipped[1].startswith(f"checkpoint-4: {expected}")


def test_full_weights_count_and_a_sharded_index_needs_its_shards(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 2)
    (ckpt / "adapter_model.safetensors").unlink()
    save_file({"w": torch.ones(2)}, ckpt / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(ckpt) == (
        "incomplete: model-00002-of-00002.safetensors (a shard model.safetensors.index.json names) is missing"
    )
    save_file({"w": torch.ones(2)}, ckpt / "model-00002-of-00002.safetensors")
    assert checkpoint_problem(ckpt) is None


def fake_deepspeed_checkpoint(root: Path, step: int) -> Path:
    """The files a ZeRO-2 LoRA SFT checkpoint holds (as DeepSpeed 0.x on CPU writes them)."""
    ckpt = root / f"checkpoint-{step}"
    tag = ckpt / f"global_step{step}"
    tag.mkdir(parents=True)
    (ckpt / "latest").write_text(f"global_step{step}")
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    save_file({"w": torch.ones(2)}, ckpt / "adapter_model.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def test_deepspeed_checkpoints_need_deepspeeds_files_not_optimizer_pt(tmp_path):
    zero2 = SimpleNamespace(
        deepspeed="ds.json", hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 2}})
    )
    layout = layout_of(zero2)
    assert layout == CheckpointLayout(deepspeed=True, zero_optimizer=True, scheduler_file=True, zero_stage=2)
    assert layout_of(SimpleNamespace(deepspeed=None)) == CheckpointLayout()
    own_scheduler = {"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}
    assert not layout_of(SimpleNamespace(deepspeed=own_scheduler)).scheduler_file

    ckpt = fake_deepspeed_checkpoint(tmp_path, 2)
    assert checkpoint_problem(ckpt, layout) is None and checkpoint_problem(ckpt, ANY_LAYOUT) is None
    assert checkpoint_problem(ckpt, CheckpointLayout()).startswith(
        "incomplete: optimizer.pt (it holds DeepSpeed's global_step*/ instead: resume with --deepspeed)"
    )
    plain = fake_checkpoint(tmp_path, 4)
    assert checkpoint_problem(plain, layout) == (
        "incomplete: DeepSpeed's state (latest, global_step*/: was it saved without --deepspeed?) is missing"
    )
    (ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(ckpt, layout) == "incomplete: global_step2/*optim_states.pt is missing"
    (ckpt / "latest").unlink()
    assert checkpoint_problem(ckpt, ANY_LAYOUT).startswith("incomplete: latest (DeepSpeed's pointer")


def test_sft_resume_skips_incomplete_checkpoints_and_a_named_one_is_one_line(tiny_llama, tmp_path, capsys):
    """Without optimizer.pt the Trainer resumed with a fresh AdamW and schedule; an empty checkpoint-999 was
    a raw traceback."""
    out = tmp_path / "sft"
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 4))
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    (out / "checkpoint-999").mkdir()
    capsys.readouterr()
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 6))
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoint-999'}: incomplete: trainer_state.json, optimizer.pt" in err
    assert f"skipping {out / 'checkpoint-4'}: incomplete: optimizer.pt is missing" in err
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert trained_steps(out) == [1, 2, 3, 4, 5, 6]

    (out / "checkpoint-6" / "scheduler.pt").unlink()
    named = [*sft_argv(tiny_llama, out, 8), "--resume_from_checkpoint", str(out / "checkpoint-6")]
    assert error_line(run_sft_with_peft.main, named, capsys) == (
        f"error: --resume_from_checkpoint {out / 'checkpoint-6'}: incomplete: scheduler.pt is missing"
    )
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6  # nothing trained


@pytest.mark.slow
def test_deepspeed_zero2_checkpoint_resumes(tiny_llama, tmp_path):
    """A real DeepSpeed checkpoint (no optimizer.pt, a global_step*/ instead) is complete under
    --deepspeed: the same command with more steps resumes from it."""
    out = tmp_path / "zero2"
    argv = [*sft_argv(tiny_llama, out, 2), "--deepspeed", str(REPO / "configs" / "ds_zero2.json")]
    for steps in (2, 4):
        proc = subprocess.run(
            [*torchrun(1), str(REPO / "run_sft_with_peft.py"), *with_flags(argv, max_steps=str(steps))],
            cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stderr and "skipping" not in proc.stderr
    assert trained_steps(out) == [1, 2, 3, 4]
    assert read_settings(out / "checkpoint-4")["per_device_train_batch_size"] == 8
    # another ZeRO stage was a bare AssertionError inside DeepSpeed's loading
    zero3 = with_flags(argv, max_steps="6", deepspeed=str(REPO / "configs" / "ds_zero3.json"))
    proc = subprocess.run([*torchrun(1), str(REPO / "run_sft_with_peft.py"), *zero3], cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "AssertionError" not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # the child's user error, not a crash
    assert (
        f"error: cannot resume from {out / 'checkpoint-4'}, saved with other settings than this run's "
        "(DeepSpeed ZeRO stage: checkpoint 2, now 3)"
    ) in proc.stderr


# --- 2. a finished run is not trained again --------------------------------------------------------


def test_a_stop_checkpoint_does_not_make_a_finished_run_train_again(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    """--save_strategy no: SIGTERM leaves checkpoint-2, the same command finishes the run (step 5), and the
    same command once more stops in one line instead of training steps 3-5 again over the final model."""
    out = tmp_path / "sft"
    argv = with_flags(quick_argv(tiny_llama, SFT_DATA, out, "--lora_rank", "4"), max_steps="5")
    undo = signal_at_training_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        run_sft_with_peft.main(argv)
    assert stopped.value.code == 143 and checkpoints(out) == ["checkpoint-2"]
    undo()
    run_sft_with_peft.main(argv)
    final = (out / "adapter_model.safetensors").read_bytes()
    state = (out / "trainer_state.json").read_text()

    assert error_line(run_sft_with_peft.main, argv, capsys) == (
        f"error: --output_dir {out} already holds a finished run (trained to step 5, final model saved) and no "
        "newer checkpoint than checkpoint-2: pass --overwrite_output_dir to train again, a larger --max_steps "
        "or --num_train_epochs to train on"
    )
    assert (out / "adapter_model.safetensors").read_bytes() == final
    assert (out / "trainer_state.json").read_text() == state

    # asking for more steps goes on from the only checkpoint there is, saying which steps run again
    run_sft_with_peft.main(with_flags(argv, max_steps="6"))
    assert "steps 3-5 are trained again before going on" in capsys.readouterr().err
    assert trained_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("save_strategy", ["steps", "epoch"])
def test_rerunning_a_finished_run_does_not_train_past_max_steps(
    tiny_llama, tmp_path, capsys, save_strategy, trainer_steps
):
    """The Trainer, resumed from the checkpoint of the last step mid-epoch, trained one step past
    --max_steps and overwrote the final model; a larger --max_steps still goes on."""
    out = tmp_path / save_strategy
    argv = sft_argv(tiny_llama, out, 5, save_strategy=save_strategy)
    run_sft_with_peft.main(argv)
    assert checkpoints(out)[-1] == "checkpoint-5"
    line = error_line(run_sft_with_peft.main, argv, capsys)
    assert "already holds a finished run (trained to step 5" in line
    line = error_line(run_sft_with_peft.main, [*argv, "--resume_from_checkpoint", "True"], capsys)
    assert "drop --resume_from_checkpoint True, pass --overwrite_output_dir to train again" in line
    assert trained_steps(out) == [1, 2, 3, 4, 5] and checkpoints(out)[-1] == "checkpoint-5"
    trainer_steps.clear()
    run_sft_with_peft.main(with_flags(argv, max_steps="6"))
    assert trained_steps(out) == [1, 2, 3, 4, 5, 6] and trainer_steps == [5]  # one step more, not six


def test_a_named_checkpoint_is_resumed_even_in_a_finished_run(tiny_llama, tmp_path, trainer_steps):
    out = tmp_path / "sft"
    argv = sft_argv(tiny_llama, out, 4)
    run_sft_with_peft.main(argv)
    trainer_steps.clear()
    run_sft_with_peft.main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert trained_steps(out) == [1, 2, 3, 4] and trainer_steps == [2, 3]


def test_save_only_model_checkpoints_are_named_as_such_not_resumed(tiny_llama, tmp_path, capsys):
    """They hold no optimizer or scheduler state: a resume would restart AdamW and the schedule."""
    out = tmp_path / "sft"
    argv = [*sft_argv(tiny_llama, out, 4), "--save_only_model"]
    run_sft_with_peft.main(argv)
    assert not (out / "checkpoint-4" / "optimizer.pt").exists()
    line = error_line(run_sft_with_peft.main, argv, capsys)
    assert "already holds a finished run (trained to step 4, final model saved): pass" in line
    line = error_line(run_sft_with_peft.main, with_flags(argv, max_steps="6"), capsys)
    assert "its checkpoints were saved with --save_only_model (weights, no optimizer" in line
    assert "--peft_path (LoRA) or --model_name_or_path (full fine-tuning)" in line
    assert trained_steps(out) == [1, 2, 3, 4]


# --- 3. a resume with other settings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"per_device_train_batch_size": "4"}, "per_device_train_batch_size: checkpoint 8, now 4"),
        ({"gradient_accumulation_steps": "2"}, "gradient_accumulation_steps: checkpoint 1, now 2"),
        ({"seed": "7"}, "--seed: checkpoint 42, now 7"),
        ({"lora_rank": "8"}, "--lora_rank: checkpoint 4, now 8"),
        ({"lora_alpha": "16"}, "--lora_alpha: checkpoint 32.0, now 16.0"),
        ({"lora_target": "q_proj,v_proj"}, "--lora_target: checkpoint down_proj,gate_proj,k_proj,o_proj,"),
        ({"lora_rank": "-1"}, "--lora_rank: checkpoint 4, now -1 (full fine-tuning)"),
        ({"split_ratio": "0.5"}, "number of training examples: checkpoint "),
    ],
)
def test_sft_resume_with_other_settings_is_one_line(tiny_llama, tmp_path, capsys, flags, expected):
    out = tmp_path / "sft"
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 2))
    line = error_line(run_sft_with_peft.main, sft_argv(tiny_llama, out, 4, **flags), capsys)
    assert line.startswith(f"error: cannot resume from {out / 'checkpoint-2'}, saved with other settings")
    assert expected in line
    assert line.endswith(
        "run with the settings it was saved with, or pass --overwrite_output_dir to start afresh"
    )
    assert trained_steps(out) == [1, 2]  # nothing trained


def test_batch_size_is_refused_before_the_model_loads(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sft"
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 2))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("rlhf.sft.stage.build_sft_model", no_model)
    argv = sft_argv(tiny_llama, out, 4, per_device_train_batch_size="4", gradient_accumulation_steps="2")
    line = error_line(run_sft_with_peft.main, argv, capsys)
    assert (
        "--gradient_accumulation_steps: checkpoint 1, now 2; --per_device_train_batch_size: checkpoint 8"
        in line
    )


def test_changeable_settings_resume_and_an_unrecorded_checkpoint_warns(tiny_llama, tmp_path, capsys):
    out = tmp_path / "sft"
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 2))
    saved = read_settings(out / "checkpoint-2")
    assert (
        saved["lora_rank"] == 4
        and saved["number of processes"] == 1
        and saved["model"] == str(Path(tiny_llama).resolve())
    )
    # learning rate, logging and packing may change
    run_sft_with_peft.main(
        sft_argv(tiny_llama, out, 4, learning_rate="1e-3", logging_steps="2", packing="true")
    )
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4

    (out / "checkpoint-4" / SETTINGS_FILE).unlink()  # as saved before settings were recorded
    capsys.readouterr()
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 6, per_device_train_batch_size="4"))
    assert f"{out / 'checkpoint-4'} records no resume settings" in capsys.readouterr().err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_reward_model_resumes_and_a_resume_with_another_adapter_is_one_line(
    tiny_llama, tmp_path, capsys, trainer_steps
):
    out = tmp_path / "rm"
    argv = rm_quick_argv(tiny_llama, REPO / "rm_data", out, "--lora_rank", "4")
    argv = with_flags(argv, save_strategy="steps", save_steps="2", max_steps="2")
    run_rm_with_peft.main(argv)
    assert "score" in read_settings(out / "checkpoint-2")["modules_to_save"]
    line = error_line(run_rm_with_peft.main, with_flags(argv, max_steps="4", lora_rank="8"), capsys)
    assert "than this run's (--lora_rank: checkpoint 4, now 8):" in line
    trainer_steps.clear()
    run_rm_with_peft.main(with_flags(argv, max_steps="4"))
    assert trainer_steps == [2, 3]  # the same command with more steps resumes from checkpoint-2


def test_changed_input_files_are_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    ckpt = fake_checkpoint(tmp_path / "out", 2)
    (ckpt / SETTINGS_FILE).write_text(
        json.dumps({"seed": 1, **inputs_settings({"--dataset_dir": str(data)})})
    )
    check_resume_settings(ckpt, {"seed": 1, **inputs_settings({"--dataset_dir": str(data)})})
    (data / "b.jsonl").write_text('{"instruction": "c", "output": "d"}\n')
    with pytest.raises(CheckpointError, match=r"files of --dataset_dir: changed since the checkpoint"):
        check_resume_settings(ckpt, {"seed": 1, **inputs_settings({"--dataset_dir": str(data)})})
    # what only one side records is not compared; tuples and lists are the same setting
    assert differences({"lora_target": ["q", "v"], "old": 1}, {"lora_target": ("q", "v"), "new": 2}) == []

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", seed=2)
    with pytest.raises(CheckpointError, match=r"\(--seed: checkpoint 1, now 2\)"):
        prepare_output_dir(args, overwrite=False, settings={"seed": 2})


def test_sft_resume_after_the_data_changed_is_one_line_before_the_model_loads(
    tiny_llama, tmp_path, capsys, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text((SFT_DATA / "feelings_alpaca.json").read_text())
    out = tmp_path / "sft"
    argv = with_flags(sft_argv(tiny_llama, out, 2), dataset_dir=str(data))
    run_sft_with_peft.main(argv)
    assert read_settings(out / "checkpoint-2")["files of --dataset_dir"][0][0] == "rows.json"
    (data / "more.jsonl").write_text('{"instruction": "a new row", "output": "that moves every later one"}\n')

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("rlhf.sft.stage.build_sft_model", no_model)
    line = error_line(run_sft_with_peft.main, with_flags(argv, max_steps="4"), capsys)
    assert (
        "(files of --dataset_dir: changed since the checkpoint (names, sizes or modification times))" in line
    )
    assert trained_steps(out) == [1, 2]


# --- 4. the stop checkpoint rotates like any other -------------------------------------------------


def test_the_stop_checkpoint_rotates_under_save_total_limit(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    argv = sft_argv(tiny_llama, out, 6, save_total_limit="1")
    signal_at_training_step(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(SystemExit):
        run_sft_with_peft.main(argv)
    assert checkpoints(out) == ["checkpoint-3"]  # checkpoint-2 went, as docs/sft.md says


def test_overwrite_output_dir_trains_a_finished_run_again(tiny_llama, tmp_path):
    out = tmp_path / "sft"
    argv = sft_argv(tiny_llama, out, 2)
    run_sft_with_peft.main(argv)
    run_sft_with_peft.main([*argv, "--overwrite_output_dir"])
    assert trained_steps(out) == [1, 2] and checkpoints(out) == ["checkpoint-2"]


# --- 5. only checkpoint-N dirs are ours to delete ----------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "best"), [(2, None), (1, None), (2, "checkpoint-1"), (1, "checkpoint-2"), (9, None)]
)
def test_rotation_keeps_what_transformers_keeps_and_never_touches_other_dirs(tmp_path, limit, best):
    """transformers' rotate_checkpoints is the reference on checkpoint-N dirs; its glob also deleted a user's
    checkpoint-best/ and checkpoint-1-backup/ (and so did --overwrite_output_dir), which ours leaves."""
    from transformers.trainer_utils import rotate_checkpoints as transformers_rotation

    from rlhf.checkpoint_dirs import rotate_checkpoints

    def make(root: Path, extra: bool) -> Path:
        for n in (1, 2, 3, 4):
            (root / f"checkpoint-{n}").mkdir(parents=True)
        for name in ("checkpoint-best", "checkpoint-1-backup") if extra else ():
            (root / name).mkdir()
        return root

    reference, ours = make(tmp_path / "reference", False), make(tmp_path / "ours", True)
    transformers_rotation(str(reference), limit, best and str(reference / best))
    rotate_checkpoints(ours, limit, ours / "checkpoint-4", best and ours / best)  # 4 just written
    kept = sorted(p.name for p in ours.iterdir())
    assert kept == sorted([p.name for p in reference.iterdir()] + ["checkpoint-best", "checkpoint-1-backup"])


@pytest.mark.parametrize("best", [None, "checkpoint-5"])
def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, best):
    """A run resumed from checkpoint-5 (a damaged checkpoint-10 of an earlier run skipped) writes
    checkpoint-6: keeping the highest N deleted it, and every later one."""
    from rlhf.checkpoint_dirs import rotate_checkpoints

    for n in (5, 6, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
    rotate_checkpoints(
        tmp_path, 1 if best is None else 2, tmp_path / "checkpoint-6", best and tmp_path / best
    )
    assert checkpoints(tmp_path) == (["checkpoint-6"] if best is None else ["checkpoint-5", "checkpoint-6"])


def test_overwrite_output_dir_removes_only_checkpoint_n_dirs(tiny_llama, tmp_path):
    out = tmp_path / "sft"
    run_sft_with_peft.main(sft_argv(tiny_llama, out, 2))
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-7-backup").mkdir()
    run_sft_with_peft.main([*sft_argv(tiny_llama, out, 2), "--overwrite_output_dir"])
    assert (out / "checkpoint-best").is_dir() and (out / "checkpoint-7-backup").is_dir()
    assert checkpoints(out) == ["checkpoint-2"]
