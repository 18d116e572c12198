"""How the PPO loop puts its losses together: the terms of one mini-batch's actor and critic losses with their
weights and signs, divided by the accumulation steps, and the shaping of the scores (missing-EOS penalty,
clipping). The terms themselves are pure functions tested against references in tests/test_ppo_math.py;
here each coefficient is set to a distinct non-default value, so a dropped or swapped one shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
from rlhf.ppo.data import PromptSet
from rlhf.ppo.loop import TrainState, collect_rollout, ppo_mini_batch_step
from rlhf.ppo.losses import entropy_bonus, kl_loss, policy_loss, value_loss
from rlhf.ppo.metrics import MetricsAccumulator
from rlhf.ppo.rewards import RuleScorer, shaped_scores
from rlhf.ppo.session import SessionParts, assemble_session, rollout_generator
from rlhf.ppo.stats import tokens_per_process

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Tell me how you feel about cats.", "Hi", "What is two plus two?", "Name a colour."]


def test_shaped_scores_penalise_only_unended_responses_then_clip():
    scores = torch.tensor([0.5, 3.0, -0.2, 9.0, -9.0])
    ended = torch.tensor([True, False, False, True, False])
    shaped = shaped_scores(scores, ended, missing_eos_penalty=1.5, clip=4.0)
    assert torch.equal(shaped, torch.tensor([0.5, 1.5, -1.7, 4.0, -4.0]))
    assert torch.equal(scores, torch.tensor([0.5, 3.0, -0.2, 9.0, -9.0]))  # the input is left as it was
    assert torch.equal(shaped_scores(scores, ended, None, 5.0), torch.tensor([0.5, 3.0, -0.2, 5.0, -5.0]))


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


@pytest.mark.parametrize(("accumulation", "entropy_coef"), [(1, 0.25), (2, 0.25), (1, 0.0)])
def test_mini_batch_losses_weigh_each_term_and_divide_by_the_accumulation(
    tiny_llama, world_of_one, tmp_path, accumulation, entropy_coef
):
    """Each term at its weight, over the accumulation; at --entropy_coef 0 the entropy is still reported
    but asked for as a metric only (no backward through it)."""
    from rlhf.backend.accelerate import AccelerateBackend
    from rlhf.models import load_tokenizer
    from rlhf.ppo.peft_models import build_peft_policy_models

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_llama), padding_side="left")
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    models = build_peft_policy_models(
        str(tiny_llama), actor=spec, critic=spec, reward_adapter=None, critic_init="sft"
    )
    ppo = PPOArguments(
        max_response_length=5, per_device_mini_train_batch_size=4, use_kl_loss=True, kl_penalty_beta=0.3,
        ratio_clip=0.05, value_clip=0.4, entropy_coef=entropy_coef, actor_loss_weight=0.7, critic_loss_weight=1.3,
        pretrain_loss_weight=0.5, pretrain_warmup_steps=10, pretrain_batch_size=2, old_logprobs="forward",
    )  # fmt: skip
    args = PPOTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=1, seed=0,
    )  # fmt: skip
    pretrain = torch.randint(3, tokenizer.vocab_size, (6, 8))
    parts = SessionParts(
        backend=AccelerateBackend(), models=models, scorer=RuleScorer(length_reward, "length"),
        tokenizer=tokenizer, prompts=PromptSet([tokenizer(p)["input_ids"] for p in PROMPTS], PROMPTS),
        generator=rollout_generator(ppo, args, models.generation_model, tokenizer), pretrain=pretrain,
    )  # fmt: skip
    s = assemble_session(parts, ppo, args, {})
    state = TrainState(step=3)  # the pretraining weight is warming up: 0.5 * 3 / 10
    buffer = collect_rollout(s, state, MetricsAccumulator())
    # move both adapters away from the weights that sampled: ratios and values then differ from the
    # rollout's, and the clipping ranges (0.05 and 0.4) matter
    with torch.no_grad():
        for name, param in models.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.2)
    models.train(True)
    blocks = torch.tensor([1, 4])
    s.pretrain_sampler.next = lambda: blocks
    backward = s.backend.backward
    recorded: list[torch.Tensor] = []
    s.backend.backward = lambda loss: (recorded.append(loss.detach().clone()), backward(loss))[1]
    entropy_grads, policy_logprobs = [], models.policy_logprobs
    models.policy_logprobs = lambda *a, **k: (
        entropy_grads.append(k.get("entropy_grad")),
        policy_logprobs(*a, **k),
    )[1]

    out = {k: float(v) for k, v in ppo_mini_batch_step(s, buffer, state).items()}
    del models.policy_logprobs
    assert entropy_grads == [entropy_coef != 0]

    batch, old = buffer.mini_batch(0)
    mask = batch.response_mask
    tokens = tokens_per_process(mask, s.backend.reduce_sum, 1)
    with torch.no_grad():
        logprobs, entropy = models.policy_logprobs(batch, ppo.temperature, with_entropy=True)
        policy = policy_loss(
            logprobs, old["old_logprobs"], old["advantages"], mask, 0.05, ppo.loss_agg_mode,
            ppo.max_response_length, tokens,
        )  # fmt: skip
        values = value_loss(
            models.values(batch).float(), old["old_values"], old["returns"], mask, 0.4, tokens
        )
        kl = kl_loss(logprobs, old["ref_logprobs"], mask, tokens)
        pretrain_loss = models.pretrain_loss(pretrain[blocks])
    assert 0 < float(policy.clipfrac) < 1 and 0 < float(values.clipfrac) < 1  # both clips are active
    expected_actor = (
        0.7 * policy.loss - entropy_coef * entropy_bonus(entropy, mask, tokens) + 0.15 * pretrain_loss
    )
    expected_actor = expected_actor + 0.3 * kl
    assert len(recorded) == 2  # the actor's loss, then the critic's
    torch.testing.assert_close(recorded[0], expected_actor / accumulation, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded[1], 1.3 * values.loss / accumulation, rtol=1e-5, atol=1e-6)
    assert out["loss/pretrain_weight"] == pytest.approx(0.15)
    assert out["loss/policy"] == pytest.approx(float(policy.loss), rel=1e-5)
    assert out["loss/value"] == pytest.approx(float(values.loss), rel=1e-5)
    assert out["loss/kl"] == pytest.approx(float(kl), rel=1e-5, abs=1e-7)
    assert out["policy/entropy"] == pytest.approx(float(entropy_bonus(entropy, mask, tokens)), rel=1e-5)


def test_a_non_finite_loss_stops_the_run_before_its_optimizer_step(tiny_llama, tmp_path, capsys, monkeypatch):
    """The losses are read on the host once per optimizer step (no wait for the device after each
    mini-batch), and before that step: a NaN policy loss in the second mini-batch is one line naming it and
    the step, and no weight took it."""
    import dataclasses

    import run_ppo_with_peft
    from rlhf.backend.accelerate import AccelerateBackend
    from rlhf.ppo import loop

    calls, real = [], loop.policy_loss

    def nan_in_the_second(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return dataclasses.replace(loss, loss=loss.loss * float("nan")) if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "policy_loss", nan_in_the_second)
    monkeypatch.setattr(AccelerateBackend, "step", lambda *a, **k: pytest.fail("an optimizer step was taken"))
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main([
            "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_response_length", "4", "--disable_tqdm", "true",
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "non-finite {'loss/policy': nan} at step 1; stopped" in err, err
    assert len(calls) == 2
