"""--old_logprobs update: an on-policy update (one epoch, one optimizer step per rollout, no KL in the
reward) takes its own forward, detached, as the old log-probs. With no dropout in float32 that is the
eval forward the rollout would otherwise run: the same training, one actor forward per rollout fewer; the
KL statistics move from the rollout to the update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ppo_estimator_runs import tp_argv
from test_ppo_run import one_thread  # noqa: F401 (autouse fixture)

import rlhf.ppo.batch as batch_module
import run_ppo_with_peft
from rlhf.ppo.peft_models import PeftPolicyModels

REPO = Path(__file__).resolve().parents[1]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def grpo_argv(model: Path, reward: str, out: Path, old_logprobs: str) -> list[str]:
    # 4 prompts x K = 2 in mini-batches of 4, accumulation 2: one optimizer step per rollout
    return [
        "--sft_model_path", str(model), "--reward_fn", reward, "--dataset_dir", str(REPO / "sft_data"),
        "--output_dir", str(out), "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
        "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--ppo_epochs", "1", "--use_kl_loss", "--kl_penalty_beta", "0.5",
        "--actor_lora_dropout", "0", "--max_response_length", "8", "--max_steps", "3", "--logging_steps", "1",
        "--save_steps", "100", "--seed", "3", "--actor_lr", "1e-2", "--disable_tqdm", "true",
        "--old_logprobs", old_logprobs,
    ]  # fmt: skip


def test_the_on_policy_update_trains_as_with_an_eval_forward_and_runs_none(
    tiny_llama, length_reward, tmp_path, monkeypatch
):
    # the two runs agree bit for bit only when both forwards see the same widths: the rollout's full one
    # (fitted widths, rlhf/ppo/batch.py, move the last bits, which Adam's first steps can turn into ±lr)
    monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", 10**9)
    calls = []
    policy_logprobs = PeftPolicyModels.policy_logprobs

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return policy_logprobs(self, *args, **kwargs)

    monkeypatch.setattr(PeftPolicyModels, "policy_logprobs", counted)
    runs = {}
    for source in ("forward", "auto"):  # auto resolves to update here
        calls.clear()
        run_ppo_with_peft.main(grpo_argv(tiny_llama, length_reward, tmp_path / source, source))
        runs[source] = (read_metrics(tmp_path / source / "metrics.jsonl"), list(calls))
    (forward_rows, forward_calls), (update_rows, update_calls) = runs["forward"], runs["auto"]
    # the eval forward in chunks of --per_device_forward_batch_size (the mini-batch, 4): 2 per rollout
    assert forward_calls.count(False) == 6 and update_calls == [True] * 6  # 3 rollouts, 6 mini-batches

    a = load_file(tmp_path / "forward" / "adapter_model.safetensors")
    b = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    for f, u in zip(forward_rows, update_rows):
        assert set(f) == set(u)
        for key in ("loss/policy", "loss/kl", "objective/kl", "objective/rlhf_reward", "reward/score"):
            assert u[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6), (u["step"], key)
        assert u["policy/clipfrac"] == 0.0 and u["policy/approxkl"] == 0.0  # the ratio is exactly 1
    assert update_rows[-1]["objective/kl"] > 0 and update_rows[0]["objective/kl"] == 0.0  # B = 0 at first


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--ppo_epochs", "2"], "--ppo_epochs 2"),
        (
            ["--gradient_accumulation_steps", "1"],
            "2 mini-batches per rollout, --gradient_accumulation_steps 1",
        ),
        (
            ["--gradient_accumulation_steps", "3"],
            "2 mini-batches per rollout, --gradient_accumulation_steps 3",
        ),
        (["--target_kl", "1.0"], "--target_kl"),
    ],
)
def test_an_update_that_is_not_on_policy_refuses_the_flag(
    tiny_llama, length_reward, tmp_path, capsys, flags, reason
):
    argv = grpo_argv(tiny_llama, length_reward, tmp_path / "out", "update")
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit):
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert f"--old_logprobs update needs an on-policy update, but: {reason}" in err


def test_kl_in_the_reward_is_not_on_policy(tiny_llama, length_reward, tmp_path, capsys):
    argv = [
        a for a in grpo_argv(tiny_llama, length_reward, tmp_path / "out", "update") if a != "--use_kl_loss"
    ]
    with pytest.raises(SystemExit):
        run_ppo_with_peft.main(argv)
    assert "but: the KL is in the reward" in capsys.readouterr().err


def test_tp_on_policy_update_runs(tiny_llama, length_reward, gsm8k_file, tmp_path, world_of_one, capfd):
    from rlhf.tp import ppo_train

    argv = tp_argv(tiny_llama, length_reward, gsm8k_file, tmp_path, "--advantage_estimator", "grpo",
                   "--num_samples_per_prompt", "2", "--use_kl_loss", "--old_logprobs", "update",
                   "--gradient_accumulation_steps", "2")  # fmt: skip
    argv[argv.index("--ppo_epochs") + 1] = "1"
    argv += ["--critic_save_dir", str(tmp_path / "c")]  # a critic-free run says it ignores it
    ppo_train.main(argv)
    assert "--advantage_estimator grpo trains no critic: --critic_save_dir not used" in capfd.readouterr().err
    assert not (tmp_path / "c").exists()
    rows = read_metrics(tmp_path / "a_run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["policy/clipfrac"] == 0.0 and "objective/kl" in r for r in rows)


def test_resume_is_bit_identical(tiny_llama, length_reward, tmp_path):
    """A checkpoint falls between rollouts (one optimizer step each): the resumed run goes on bit for bit."""
    import shutil

    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def argv(out: Path) -> list[str]:
        args = grpo_argv(tiny_llama, length_reward, out, "update")
        args[args.index("--save_steps") + 1] = "2"
        return args

    run_ppo_with_peft.main(argv(full))
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_ppo_with_peft.main(argv(resumed))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [3]  # the resumed run writes its own rows
    assert {k: v for k, v in rows_a[-1].items() if not k.startswith(("time/", "samples_per_s"))} == {
        k: v for k, v in rows_b[-1].items() if not k.startswith(("time/", "samples_per_s"))
    }


def test_k3_statistics_of_the_update_mask_the_pads_before_the_estimate(tiny_llama, length_reward, tmp_path):
    """Responses that end early (a third of the vocabulary is EOS) at a low temperature: after EOS the
    update's log-prob of a pad is below -88, where k3's exp overflows; masked first, the update's
    objective/kl equals the eval forward's, not NaN."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = model / "generation_config.json"
    generation = json.loads(config.read_text()) if config.exists() else {}
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    config.write_text(json.dumps(generation | {"eos_token_id": list(range(3, vocab, 3))}))
    rows = {}
    for source in ("forward", "update"):
        argv = grpo_argv(model, length_reward, tmp_path / source, source)
        argv[argv.index("--max_response_length") + 1] = "16"
        run_ppo_with_peft.main(argv + ["--kl_penalty", "k3", "--temperature", "0.005"])
        rows[source] = read_metrics(tmp_path / source / "metrics.jsonl")
    assert any(r["response/length_mean"] < 16 for r in rows["update"])  # some responses ended early
    for f, u in zip(rows["forward"], rows["update"]):
        for key in ("objective/kl", "objective/rlhf_reward"):
            assert u[key] is not None and u[key] == pytest.approx(f[key], rel=1e-4, abs=1e-5), (
                u["step"],
                key,
            )
