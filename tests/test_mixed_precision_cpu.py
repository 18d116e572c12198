"""The stages under ``--bf16`` mixed precision, on CPU (``--use_cpu True``; the PPO loop's autocast).

``make test`` has no GPU, and the seed commands drop ``--fp16``/``--bf16`` there; but the code paths that
only run under mixed precision (Accelerate's autocast, model outputs converted to float32, bf16 weights)
run on CPU too once the flags are kept. Full fine-tuning under ``--torch_dtype bfloat16 --bf16`` crashed
the SFT stage's fused loss on an H200 (float32 hidden states against bf16 weights), which no CPU test
saw; the SFT tests here fail the same way on the code before that fix. These runs exercise those paths
for SFT (full fine-tuning, padded and packed), the reward model (LoRA, packed) and PPO.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_gpu import in_precision
from test_ppo_models import build_rm_adapter
from test_ppo_run import read_metrics, reference_command
from test_reward_stage import SEED_FLAGS as RM_SEED_FLAGS
from test_sft_outputs import with_flags
from test_sft_stage import seed_argv

import rlhf.args
import rlhf.models.loading as loading
import rlhf.reward.model as reward_model
import run_ppo_with_peft
import run_rm_with_peft
import run_sft_with_peft
from rlhf.tiny_models import REPO_ROOT

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def keep_precision_flags(monkeypatch):
    """Keep ``--bf16`` and ``--torch_dtype bfloat16`` on this CPU machine, as on a GPU, instead of dropping
    them with a warning (bf16 weights under Accelerate's bf16 autocast)."""
    monkeypatch.setattr(rlhf.args, "GPU_ONLY_FLAGS", ())

    def as_named(name, config=None):
        return "auto" if name in (None, "", "auto") else loading.DTYPES[name]

    for module in (loading, reward_model):
        monkeypatch.setattr(module, "resolve_dtype", as_named)


def in_bf16(argv: list[str], trainer: bool = True) -> list[str]:
    """A seed command switched to bf16 as on a GPU (``--use_cpu True`` for the Trainer stages)."""
    argv = in_precision(argv, "bf16") + ["--use_cpu", "True"] * trainer
    return with_flags(argv, report_to="none", dataloader_num_workers="0")


def trainer_losses(out) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_full_fine_tuning_in_bf16(tiny_llama, tmp_path, keep_precision_flags, packing):
    out = tmp_path / "sft"
    argv = seed_argv(tiny_llama, REPO_ROOT / "sft_data", out, tmp_path / "cache", lora_rank="-1")
    argv = with_flags(argv, max_steps="2", logging_steps="1", eval_steps="2", save_steps="2")
    metrics = run_sft_with_peft.main(in_bf16(argv + ["--packing"] * packing))
    losses = trainer_losses(out)
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert math.isfinite(metrics["eval_loss"])


def test_reward_model_packed_in_bf16(tiny_llama, tmp_path, keep_precision_flags):
    out = tmp_path / "rm"
    argv = RM_SEED_FLAGS.format(
        model=tiny_llama, data=REPO_ROOT / "rm_data", out=out, cache=tmp_path / "c"
    ).split()
    argv = with_flags(argv, max_steps="2", logging_steps="1", eval_steps="2", save_steps="2")
    metrics = run_rm_with_peft.main(in_bf16(argv + ["--packing"]))
    assert len(trainer_losses(out)) == 2 and all(math.isfinite(x) for x in trainer_losses(out))
    assert 0 <= metrics["eval_accuracy"] <= 1


@pytest.mark.parametrize("old_logprobs", ["auto", "generator"])
def test_ppo_in_bf16(tiny_llama, tmp_path, keep_precision_flags, old_logprobs):
    """PPO trains in bf16. At the first rollout the actor's LoRA B is zero, so the actor is the reference:
    with ``--old_logprobs auto`` (an eval forward in bf16) the KL is exactly 0; the engine's own log-probs
    (``generator``) come from a decode path that rounds differently and show a KL that is not there."""
    rm = build_rm_adapter(tiny_llama, tmp_path / "rm")
    argv = reference_command(tiny_llama, rm, tmp_path)
    argv = with_flags(
        argv, max_steps="2", logging_steps="1", save_steps="2", max_response_length="24",
        old_logprobs=old_logprobs,
    )  # fmt: skip
    run_ppo_with_peft.main(in_bf16(argv, trainer=False))
    metrics = read_metrics(tmp_path / "actor" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss/policy"]) and math.isfinite(m["loss/value"]) for m in metrics)
    if old_logprobs == "auto":
        assert metrics[0]["objective/kl"] == 0.0
    else:
        assert abs(metrics[0]["objective/kl"]) > 1e-4


def test_old_logprobs_auto_takes_the_generators_in_float32_only_and_the_updates_when_on_policy():
    from contextlib import contextmanager, nullcontext
    from types import SimpleNamespace

    from rlhf.errors import ConfigError
    from rlhf.ppo.config import PPOArguments, check_old_logprobs
    from rlhf.ppo.session import old_logprobs_source

    class Backend:
        device = torch.device("cpu")

        def __init__(self, autocast: bool) -> None:
            self.on = autocast

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16) if self.on else nullcontext()

    class Models:
        def __init__(self, dtype: torch.dtype) -> None:
            self.model = torch.nn.Linear(2, 2).to(dtype)

        @contextmanager
        def generation_model(self):
            yield self.model

    def source(choice: str, models: Models, backend: Backend, **ppo_flags) -> str:
        # 8 prompts x 2 samples in mini-batches of 4: one optimizer step per rollout at accumulation 4
        args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=4)
        flags = dict(num_samples_per_prompt=2, per_device_mini_train_batch_size=4, old_logprobs=choice)
        return old_logprobs_source(PPOArguments(**(flags | ppo_flags)), args, models, backend)

    fp32, bf16 = Models(torch.float32), Models(torch.bfloat16)
    assert source("auto", fp32, Backend(False)) == "generator"  # the KL is in the reward
    assert source("auto", fp32, Backend(True)) == "forward"  # --bf16 autocast
    assert source("auto", bf16, Backend(False)) == "forward"  # bf16 weights
    assert source("generator", bf16, Backend(True)) == "generator"
    assert source("forward", fp32, Backend(False)) == "forward"
    # on-policy: one epoch, no optimizer step inside a rollout, the KL in the loss (or none) and a fixed β
    assert source("auto", bf16, Backend(True), use_kl_loss=True) == "update"
    assert source("auto", bf16, Backend(True), kl_penalty_beta=0.0) == "update"
    assert source("auto", bf16, Backend(True), use_kl_loss=True, ppo_epochs=2) == "forward"
    assert source("auto", bf16, Backend(True), use_kl_loss=True, target_kl=6.0) == "forward"
    # 2 mini-batches per rollout at accumulation 4: two whole rollouts per optimizer step, still on-policy
    assert (
        source("auto", bf16, Backend(True), use_kl_loss=True, per_device_mini_train_batch_size=8) == "update"
    )
    # 8 mini-batches per rollout at accumulation 4: a step inside each rollout
    assert (
        source("auto", bf16, Backend(True), use_kl_loss=True, per_device_mini_train_batch_size=2) == "forward"
    )
    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1)
    with pytest.raises(
        ConfigError, match="--old_logprobs update needs an on-policy update, but: 4 mini-batches"
    ):
        check_old_logprobs(PPOArguments(per_device_mini_train_batch_size=2, old_logprobs="update"), args)


@pytest.mark.parametrize("bf16", [True, False])
def test_an_adapters_fully_trained_head_is_float32_under_bf16(tiny_llama, bf16):
    """A bf16 base with a LoRA reward model: PEFT copies the ``score`` head in bf16, where AdamW's steps of
    about the learning rate round away; under --bf16 it is kept in float32 (the adapter already is), and the
    frozen base stays bf16. Without mixed precision nothing is cast (a float32 head would meet bf16 inputs)."""
    from peft import TaskType
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.lora import LoraSpec
    from rlhf.training.trainable import make_trainable

    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.bfloat16)
    model = make_trainable(
        base, LoraSpec(4, 8, 0.0, ["q_proj", "v_proj"]), task_type=TaskType.SEQ_CLS, head_modules=("score",),
        bf16=bf16,
    )  # fmt: skip
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    heads = {dtype for name, dtype in trained.items() if "score" in name}
    assert heads == {torch.float32 if bf16 else torch.bfloat16}
    assert {dtype for name, dtype in trained.items() if "lora_" in name} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_ppo_takes_mixed_precision_from_accelerate_launch(monkeypatch, caplog):
    """``accelerate launch --mixed_precision bf16`` (or its config's ``mixed_precision: bf16``) used to be
    overridden by PPO's explicit "no" when neither --fp16 nor --bf16 was given: fp32 PPO, no message."""
    from types import SimpleNamespace

    from rlhf.ppo.peft_factory import launch_precision

    no_flags = SimpleNamespace(fp16=False, bf16=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launch_precision(no_flags) == "no"
    assert launch_precision(SimpleNamespace(fp16=True, bf16=False)) == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch_precision(no_flags) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_precision_fallback_warned", False)
    with caplog.at_level("WARNING"):
        assert launch_precision(no_flags) == "no"
    assert (
        "mixed_precision: bf16 (from accelerate launch) needs a GPU; none found, so float32 is used"
        in caplog.text
    )


@pytest.fixture(scope="module")
def peaked_llama(tiny_model_factory, tmp_path_factory):
    """4 layers of width 128 with the output head scaled up: peaked next-token distributions (as a
    fine-tuned model's), where bf16 rounding shows in the log-probs; the 2-layer tiny model's are near
    uniform and hide it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_factory("llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
    out = tmp_path_factory.mktemp("peaked") / "model"
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_bf16_ratio_is_one_before_the_first_update_of_a_rollout(
    peaked_llama, tmp_path, keep_precision_flags, estimator
):
    """Four mini-batches of uneven prompts, all before the rollout's one optimizer step: each update sees
    the policy that sampled, so every ratio is exactly 1 (no KL, no clipping) — in bf16 too. The rollout's
    forwards used to run in chunks padded to other widths than the mini-batches, and bf16 matmuls round
    differently at another width: approxkl 8e-7 here; log-ratios up to 0.09 on an 8-layer model of width 256
    (0.24 on the TP backend, past the clip)."""
    argv = [
        "--sft_model_path", str(peaked_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO_ROOT / "sft_data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8", "--per_device_mini_train_batch_size", "2",
        "--gradient_accumulation_steps", "4", "--ppo_epochs", "1", "--max_steps", "1", "--logging_steps", "1",
        "--max_response_length", "16", "--save_steps", "100", "--disable_tqdm", "true", "--seed", "3",
        "--advantage_estimator", estimator, "--old_logprobs", "forward",
    ]  # fmt: skip
    if estimator == "grpo":  # on-policy with the KL in the loss: the update's own log-probs are the old ones
        argv[argv.index("--per_device_train_batch_size") + 1] = "4"
        argv[argv.index("--old_logprobs") + 1] = "auto"
        argv += ["--num_samples_per_prompt", "2", "--use_kl_loss"]
    run_ppo_with_peft.main(in_bf16(argv, trainer=False))
    (row,) = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert row["policy/approxkl"] == 0.0 and row["policy/clipfrac"] == 0.0, row
    if estimator == "grpo":  # the actor is the reference before its first step (LoRA B = 0): no KL either,
        assert row["loss/kl"] == 0.0, (
            row
        )  # as the reference's forwards ran at the updates' widths (was 1.2e-9 here, 3.5e-6 on a deeper model)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_a_separate_reward_model_scores_in_float32_under_bf16(tiny_llama, weights):
    """--reward_model_path under --bf16 autocast (float32 or bf16 weights): the score head ran in bf16 and
    every score was a bf16 number (0.004 off at these sizes, 0.03 at a score of 4, where a group's equal
    answers then tie). Now the head reads its hidden state in float32."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.ppo.batch import SequenceBatch, left_pad
    from rlhf.ppo.rewards import SequenceClassifierScorer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=weights)
    with torch.no_grad():
        model.score.weight.normal_(0, 3.0)  # scores of a few units, as a trained head gives
    scorer = SequenceClassifierScorer(model, torch.device("cpu"))
    ids, mask = left_pad([[1, 10, 11, 12, 20, 2], [1, 13, 21, 22, 2], [1, 14, 15, 23, 24, 25, 2]], 0)
    batch = SequenceBatch(ids, mask, 0)
    hidden = []
    hook = model.score.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer.score(batch, [], [])
    hook.remove()
    last = hidden[0][torch.arange(3), mask.shape[1] - 1]  # left-padded: every row ends in the last column
    expected = last.float() @ model.score.weight.float().T
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected[:, 0], rtol=0, atol=0)
    assert (scores != scores.bfloat16().float()).all()  # not rounded to bf16


def test_fp16_overflows_show_in_the_metrics(tiny_llama, tmp_path, keep_precision_flags, monkeypatch):
    """--fp16 (a float16 base, float32 adapters, CPU float16 autocast) with a loss scale so large that every gradient
    overflows: each step is skipped, the scale halves, and the rows say so (they used to show only a
    `null` gradient norm)."""
    import rlhf.backend.accelerate as accelerate_backend

    original = accelerate_backend.torch.amp.GradScaler

    def huge_scale(device, enabled=True, **kwargs):
        return original(device, init_scale=2.0**100, enabled=enabled, **kwargs)

    monkeypatch.setattr(accelerate_backend.torch.amp, "GradScaler", huge_scale)
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO_ROOT / "sft_data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "2", "--per_device_mini_train_batch_size", "2", "--max_steps", "2",
        "--logging_steps", "1", "--max_response_length", "8", "--save_steps", "100", "--disable_tqdm", "true",
        "--fp16", "--torch_dtype", "float16",
    ]  # fmt: skip
    run_ppo_with_peft.main(argv)
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["fp16/skipped_frac"] for r in rows] == [1.0, 1.0]
    assert rows[0]["fp16/loss_scale"] == 2.0**99 and rows[1]["fp16/loss_scale"] == 2.0**98
    assert rows[0]["grad_norm/actor"] is None
