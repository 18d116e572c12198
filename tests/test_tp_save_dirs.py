"""The TP trainers replace their save dirs as a whole at the end: a save dir that held other files, the input
model or the run's own checkpoints deleted them. Now each is refused in one line before anything loads, and
a model saved there before is still replaced by a re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.errors import ConfigError
from rlhf.tp.shard_dir import check_save_dir


def test_a_save_dir_is_new_empty_or_a_saved_model_and_holds_no_input(tmp_path, monkeypatch):
    check_save_dir(tmp_path / "new", "--save_dir", {})
    (tmp_path / "empty").mkdir()
    check_save_dir(tmp_path / "empty", "--save_dir", {})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "params.json").write_text("{}")  # a model saved there before: a re-run replaces it
    (tmp_path / "model" / "consolidated.00.pth").write_text("")
    check_save_dir(tmp_path / "model", "--save_dir", {"--ckpt_dir": str(tmp_path / "elsewhere")})

    (tmp_path / "mine").mkdir()
    for name in ("a.txt", "b", "c", "d"):
        (tmp_path / "mine" / name).write_text("")
    with pytest.raises(ConfigError) as error:
        check_save_dir(tmp_path / "mine", "--save_dir", {})
    assert str(error.value) == (
        f"--save_dir {tmp_path / 'mine'} holds files that are no saved model (a.txt, b, c, ...), and it is "
        "replaced as a whole at the end: give a new or empty directory"
    )
    with pytest.raises(
        ConfigError, match=r"--actor_save_dir .*/model is or holds --actor_ckpt_dir .*/model/base"
    ):
        check_save_dir(
            tmp_path / "model", "--actor_save_dir", {"--actor_ckpt_dir": str(tmp_path / "model" / "base")}
        )
    with pytest.raises(ConfigError, match="is or holds --train_file"):
        check_save_dir(tmp_path / "model", "--save_dir", {"--train_file": str(tmp_path / "model")})
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ConfigError, match="name a directory of its own"):
        check_save_dir(".", "--save_dir", {})


def test_solver_train_refuses_a_save_dir_holding_its_model_and_deletes_nothing(tiny_llama, tmp_path, capsys):
    from rlhf.tp import solver_train

    victim = tmp_path / "victim"
    (victim / "other").mkdir(parents=True)
    (victim / "important.txt").write_text("precious")
    model = Path(tiny_llama)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "1+1=2\n#### 2"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        solver_train.main(["--ckpt_dir", str(model), "--save_dir", str(victim), "--train_file", str(train)])
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and "--save_dir" in err
        and "holds files that are no saved model (important.txt, other)" in err
    )
    assert (victim / "important.txt").read_text() == "precious" and (victim / "other").is_dir()


def test_ppo_train_refuses_save_dirs_that_hold_its_checkpoints_or_each_other(tmp_path, monkeypatch, capsys):
    from rlhf.tp import ppo_train

    monkeypatch.setattr(ppo_train, "build_tp_session", lambda *a, **k: pytest.fail("built a session first"))
    base = ["--actor_ckpt_dir", str(tmp_path / "in"), "--train_file", str(tmp_path / "in"), "--reward_fn", "gsm8k",
            "--max_batch_size", "2"]  # fmt: skip
    cases = {
        "--actor_save_dir {t}/actor is or holds --output_dir {t}/actor/run": [
            "--actor_save_dir", str(tmp_path / "actor"), "--output_dir", str(tmp_path / "actor" / "run"),
            "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
        ],
        "--actor_save_dir {t}/same is or holds --critic_save_dir {t}/same": [
            "--actor_save_dir", str(tmp_path / "same"), "--critic_save_dir", str(tmp_path / "same"),
            "--critic_ckpt_dir", str(tmp_path / "in"),
        ],
        "--actor_save_dir {t} is or holds --train_file {t}/in": ["--actor_save_dir", str(tmp_path),
            "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2"],
    }  # fmt: skip
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as exc:
            ppo_train.main(base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"error: {message.format(t=tmp_path)}" in err, (extra, err)


def test_ppo_train_refuses_the_working_directory_as_a_save_dir(tmp_path, monkeypatch, capsys):
    """``--actor_save_dir .`` was a traceback (no name to append ``_run`` to)."""
    from rlhf.tp import ppo_train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo_train, "build_tp_session", lambda *a, **k: pytest.fail("built a session first"))
    with pytest.raises(SystemExit) as exc:
        ppo_train.main(["--actor_ckpt_dir", "in", "--actor_save_dir", ".", "--train_file", "in", "--reward_fn",
                        "gsm8k", "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: --actor_save_dir .: name a directory of its own" in err, err
