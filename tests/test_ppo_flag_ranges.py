"""PPO flags outside their range are one-line errors before any model loads, on both entry points: values
that would otherwise run and silently mean something else (a score clip of 0 zeroes every score, top-p 0
is greedy and 1.5 is off, γ > 1 grows the returns, 0 epochs train nothing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_ppo_estimator_runs import assert_fails_up_front

import run_ppo_with_peft

REPO = Path(__file__).resolve().parents[1]
CASES = [
    (["--reward_score_clip", "0"], "--reward_score_clip must be > 0.0, got 0.0"),
    (["--top_p", "0"], "--top_p must be in (0.0, 1.0], got 0.0"),
    (["--top_p", "1.5"], "--top_p must be in (0.0, 1.0], got 1.5"),
    (["--top_k", "-3"], "--top_k must be >= 0, got -3"),
    (["--min_response_length", "-2"], "--min_response_length must be >= 0, got -2"),
    (["--gamma", "5"], "--gamma must be in [0.0, 1.0], got 5.0"),
    (["--lam", "-0.1"], "--lam must be in [0.0, 1.0], got -0.1"),
    (["--ratio_clip", "-0.2"], "--ratio_clip must be > 0.0, got -0.2"),
    (["--kl_penalty_beta", "-1"], "--kl_penalty_beta must be >= 0.0, got -1.0"),
    (["--actor_lr", "-1"], "--actor_lr must be >= 0.0, got -1.0"),
    (["--warmup_steps", "-5"], "--warmup_steps must be >= 0, got -5.0"),
    (["--num_train_epochs", "0"], "nothing to train: --max_steps -1, --num_train_epochs 0"),
    (["--max_steps", "0", "--num_train_epochs", "-1"], "nothing to train: --max_steps 0"),
    (["--critic_loss_weight", "-2"], "--critic_loss_weight must be >= 0.0, got -2.0"),
    (["--actor_loss_weight", "-1"], "--actor_loss_weight must be >= 0.0, got -1.0"),
    (["--entropy_coef", "-0.01"], "--entropy_coef must be >= 0.0, got -0.01"),
    (["--missing_eos_penalty", "-1"], "--missing_eos_penalty must be >= 0.0, got -1.0"),
    (
        ["--kl_penalty_beta", "0", "--target_kl", "0.1"],
        "--target_kl adapts --kl_penalty_beta by multiplying it",
    ),
    (
        ["--target_kl", "0.1", "--kl_horizon", "0.1"],
        "--kl_horizon 0.1: the adaptive KL controller multiplies β",
    ),
    (["--actor_lora_alpha", "0"], "--actor_lora_alpha must be > 0 with --actor_lora_rank 8"),
    (["--critic_lora_dropout", "1.5"], "--critic_lora_dropout must be in [0, 1), got 1.5"),
]


@pytest.mark.parametrize(("flags", "message"), CASES, ids=[c[0][0] + "=" + c[0][1] for c in CASES])
def test_peft_flags_out_of_range_fail_up_front(flags, message, tmp_path, capsys):
    assert_fails_up_front(flags, message, tmp_path, capsys)


@pytest.mark.parametrize(
    ("flags", "message"), [CASES[1], CASES[5], CASES[11]], ids=["top_p", "gamma", "epochs"]
)
def test_tp_flags_out_of_range_fail_up_front(flags, message, tmp_path, capsys):
    from rlhf.tp import ppo_train

    argv = ["--actor_ckpt_dir", str(tmp_path / "missing"), "--actor_save_dir", str(tmp_path / "a"),
            "--train_file", str(tmp_path / "missing.jsonl"), "--reward_fn", "gsm8k",
            "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2", *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        ppo_train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " + message in err, err


def test_a_reward_lora_path_that_is_no_adapter_dir_is_named(tiny_llama, tmp_path, capsys):
    def error(path) -> str:
        argv = ["--sft_model_path", str(tiny_llama), "--reward_lora_path", str(path), "--dataset_dir",
                str(REPO / "sft_data"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
        with pytest.raises(SystemExit):
            run_ppo_with_peft.main(argv)
        return capsys.readouterr().err

    assert (
        f"--reward_lora_path {tiny_llama} is a full model dir, not a LoRA adapter: pass it as --reward_model_path"
        in error(tiny_llama)
    )
    assert f"--reward_lora_path {tmp_path / 'nope'}: no such directory" in error(tmp_path / "nope")
    assert f"--reward_lora_path {tmp_path} is not a LoRA adapter dir (no adapter_config.json)" in error(
        tmp_path
    )


def test_a_missing_eos_penalty_without_any_eos_token_is_refused(tiny_llama, tmp_path, capsys):
    """No EOS id in the tokenizer or the model's generation config: no response can end, so the penalty
    would hit every one (a constant shift of the scores, not a signal)."""
    model = tmp_path / "no_eos"
    shutil.copytree(tiny_llama, model)
    for name, key in (("tokenizer_config.json", "eos_token"), ("generation_config.json", "eos_token_id"),
                      ("config.json", "eos_token_id")):  # fmt: skip
        config = json.loads((model / name).read_text())
        config[key] = None
        (model / name).write_text(json.dumps(config))
    argv = ["--sft_model_path", str(model), "--reward_fn", "rlhf.toy_task:positivity_reward", "--dataset_dir",
            str(REPO / "sft_data"), "--output_dir", str(tmp_path / "out"), "--missing_eos_penalty", "1.0"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and "--missing_eos_penalty 1.0: the tokenizer and the model name no EOS" in err
    ), err


def test_sequences_beyond_the_model_context_warn(tiny_llama, tmp_path, capsys, monkeypatch):
    """The tiny llama has 512 positions: responses of up to 600 tokens and 600-token pretraining blocks each
    get the warning SFT and the reward model give, once the model is loaded (the run is stopped there)."""
    from rlhf.ppo import peft_factory

    def stop(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(peft_factory, "assemble_session", stop)
    argv = ["--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--pretrain_dataset_dir", str(REPO / "pt_data"),
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2",
            "--max_response_length", "600", "--block_size", "600"]  # fmt: skip
    with pytest.raises(SystemExit):
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert (
        "(--max_prompt_length + --max_response_length 856), more than the model's max_position_embeddings 512"
        in err
    )
    assert "is 600 tokens (--block_size 600), more than the model's max_position_embeddings 512" in err


@pytest.mark.parametrize("flag", ["--dataset_dir", "--pretrain_dataset_dir"])
def test_missing_data_is_named_by_its_flag_before_any_model_loads(
    flag, tiny_llama, tmp_path, capsys, monkeypatch
):
    from rlhf.ppo import peft_factory

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the data")

    monkeypatch.setattr(peft_factory, "build_models_and_scorer", no_models)
    paths = {"--dataset_dir": str(REPO / "sft_data"), "--pretrain_dataset_dir": str(REPO / "pt_data")}
    paths[flag] = str(tmp_path / "nowhere")
    argv = ["--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--output_dir", str(tmp_path / "out"), *(x for item in paths.items() for x in item)]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and f"error: {flag}: {tmp_path / 'nowhere'}: no such file or directory" in err
    ), err
