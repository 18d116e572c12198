"""ppo_train's two names for one setting: the description's --max_batch_size, --max_buffer_size and
--max_gen_len and run_ppo_with_peft.py's --per_device_train_batch_size / --per_device_mini_train_batch_size,
--rollout_batches and --max_response_length. Either one alone wins; both given with values that disagree
are one line naming both (the description's flag used to overwrite the other silently); both agreeing run."""

from __future__ import annotations

import json

import pytest

BASE = ["--reward_fn", "gsm8k", "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2"]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """``settings(*flags) -> (ppo, args)`` as ppo_train.main leaves them for the session (none is built)."""
    from rlhf.tp import ppo_train

    seen = {}

    def stop(tp, ppo, args):
        seen.update(ppo=ppo, args=args)
        raise SystemExit(0)

    monkeypatch.setattr(ppo_train, "build_tp_session", stop)

    def run(*flags: str):
        paths = ["--actor_ckpt_dir", str(tmp_path), "--actor_save_dir", str(tmp_path / "a"), "--train_file",
                 str(tmp_path)]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            ppo_train.main(paths + BASE + list(flags))
        assert exit_info.value.code == 0
        return seen["ppo"], seen["args"]

    return run


def refusal(flags: list[str], tmp_path, monkeypatch, capsys) -> str:
    from rlhf.tp import ppo_train

    monkeypatch.setattr(ppo_train, "build_tp_session", lambda *a, **k: pytest.fail("built a session first"))
    paths = ["--actor_ckpt_dir", str(tmp_path), "--actor_save_dir", str(tmp_path / "a"), "--train_file",
             str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        ppo_train.main(paths + BASE + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_batch_size", "2", "--per_device_train_batch_size", "4"],
         "--max_batch_size 2 and --per_device_train_batch_size 4 both set the prompts per generation batch"),
        (["--max_batch_size", "2", "--per_device_mini_train_batch_size", "4"],
         "--max_batch_size 2 and --per_device_mini_train_batch_size 4 both set the samples per PPO mini-batch"),
        (["--max_gen_len", "8", "--max_response_length", "99"],
         "--max_gen_len 8 and --max_response_length 99 both set the new tokens per response"),
        (["--max_batch_size", "2", "--max_buffer_size", "8", "--rollout_batches", "3"],
         "--max_buffer_size 8 (2 generation batches of --max_batch_size 2 x --num_samples_per_prompt 2) and "
         "--rollout_batches 3 both set the rollout size"),
        # the spellings argparse takes: dashes, =, a unique prefix; a default value given is given too
        (["--block_size", "0"], "--block_size must be a positive number, got 0"),
        (["--max-gen-len", "8", "--max-response-length=256"],
         "--max_gen_len 8 and --max_response_length 256 both set"),
        (["--max_batch_size=2", "--per_device_train_batch=2", "--per_device_mini_train_batch_size", "8"],
         "--max_batch_size 2 and --per_device_mini_train_batch_size 8 both set"),
    ],
)  # fmt: skip
def test_two_names_with_two_values_are_one_line_naming_both(flags, message, tmp_path, monkeypatch, capsys):
    err = refusal(flags, tmp_path, monkeypatch, capsys)
    assert f"error: {message}" in err and err.count("\n") == 1, err


def test_the_reported_command_is_refused(tmp_path, monkeypatch, capsys):
    err = refusal(
        ["--max_batch_size", "2", "--per_device_train_batch_size", "4", "--max_gen_len", "8",
         "--max_response_length", "99"], tmp_path, monkeypatch, capsys,
    )  # fmt: skip
    assert "--max_batch_size 2 and --per_device_train_batch_size 4" in err


def test_either_name_alone_wins(settings):
    ppo, args = settings("--max_batch_size", "3", "--max_buffer_size", "12", "--max_gen_len", "7")
    assert (args.per_device_train_batch_size, ppo.per_device_mini_train_batch_size) == (3, 3)
    assert (ppo.rollout_batches, ppo.max_response_length) == (2, 7)
    ppo, args = settings(
        "--per_device_train_batch_size", "3", "--per_device_mini_train_batch_size", "2", "--rollout_batches",
        "4", "--max_response_length", "9",
    )  # fmt: skip
    assert (args.per_device_train_batch_size, ppo.per_device_mini_train_batch_size) == (3, 2)
    assert (ppo.rollout_batches, ppo.max_response_length) == (4, 9)


def test_both_names_agreeing_run(settings):
    ppo, args = settings(
        "--max_batch_size", "3", "--per_device_train_batch_size", "3", "--per_device_mini_train_batch_size",
        "3", "--max_buffer_size", "12", "--rollout_batches", "2", "--max_gen_len", "7", "--max_response_length",
        "7",
    )  # fmt: skip
    assert (args.per_device_train_batch_size, ppo.per_device_mini_train_batch_size) == (3, 3)
    assert (ppo.rollout_batches, ppo.max_response_length) == (2, 7)


def test_a_config_file_gives_its_keys(tmp_path, monkeypatch, capsys):
    from rlhf.tp import ppo_train

    monkeypatch.setattr(ppo_train, "build_tp_session", lambda *a, **k: pytest.fail("built a session first"))
    config = {"actor_ckpt_dir": str(tmp_path), "actor_save_dir": str(tmp_path / "a"), "train_file": str(tmp_path),
              "reward_fn": "gsm8k", "advantage_estimator": "grpo", "num_samples_per_prompt": 2, "max_gen_len": 8,
              "max_response_length": 256}  # fmt: skip
    (tmp_path / "ppo.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        ppo_train.main([str(tmp_path / "ppo.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max_gen_len 8 and --max_response_length 256 both set" in err, err


def test_called_without_a_command_line_the_values_set_are_the_given_ones(tmp_path):
    from rlhf.errors import ConfigError
    from rlhf.ppo.config import PPOArguments
    from rlhf.tp.ppo_train import TPPPOArguments, TPPPOTrainingArguments, apply_description_flags

    tp = TPPPOArguments(
        actor_ckpt_dir="a", actor_save_dir=str(tmp_path / "b"), reward_fn="gsm8k", max_gen_len=8
    )
    with pytest.raises(ConfigError, match="^--max_gen_len 8 and --max_response_length 99 both set"):
        apply_description_flags(
            tp,
            PPOArguments(advantage_estimator="reinforce_pp", max_response_length=99),
            TPPPOTrainingArguments(),
        )
    ppo = PPOArguments(advantage_estimator="reinforce_pp")
    apply_description_flags(tp, ppo, TPPPOTrainingArguments())
    assert ppo.max_response_length == 8


@pytest.mark.parametrize(
    ("dtype", "fp16", "bf16", "message"),
    [
        ("auto", True, False, "^--fp16: the tensor-parallel backend has no fp16 autocast"),
        ("float32", False, True, "^--bf16 with --dtype float32: the tensor-parallel backend computes in"),
        ("auto", False, True, None),
        ("bfloat16", False, True, None),
    ],
)
def test_autocast_flags_are_checked_against_dtype_not_ignored(tmp_path, dtype, fp16, bf16, message):
    """The TP backend has no autocast: --fp16/--bf16 (which a GPU keeps) either agree with --dtype or fail."""
    from rlhf.errors import ConfigError
    from rlhf.ppo.config import PPOArguments
    from rlhf.tp.ppo_train import TPPPOArguments, TPPPOTrainingArguments, apply_description_flags

    tp = TPPPOArguments(
        actor_ckpt_dir="a", actor_save_dir=str(tmp_path / "b"), reward_fn="gsm8k", dtype=dtype
    )
    args = TPPPOTrainingArguments(fp16=fp16, bf16=bf16)
    ppo = PPOArguments(advantage_estimator="reinforce_pp")
    if message is None:
        apply_description_flags(tp, ppo, args)
    else:
        with pytest.raises(ConfigError, match=message):
            apply_description_flags(tp, ppo, args)
