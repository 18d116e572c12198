"""Parity of the two PPO backends: from the same weights, one PPO optimizer step through the shared loop on
the PEFT bundle (Accelerate backend; Hugging Face generate or the rollout engine) and on the tensor-parallel
bundle (TP backend at world size 1, the rollout engine) gives the same rollout, losses, gradient norms and
updated LoRA weights.

Full fp32, LoRA dropout 0, non-zero LoRA B (so the adapters matter) and top-1 sampling (both engines then
pick the argmax, so the responses agree). The TP LoRA equals peft's at world size 1 (tests/test_tp_lora.py);
this checks everything between the models and the optimizer too: the rollout, the loss code path, the
parameter groups and each backend's step.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
from rlhf.ppo.data import PromptSet
from rlhf.ppo.loop import TrainState, collect_rollout, ppo_mini_batch_step
from rlhf.ppo.metrics import MetricsAccumulator
from rlhf.ppo.rewards import RuleScorer
from rlhf.ppo.session import SessionParts, assemble_session, rollout_generator

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}  # fmt: skip
PROMPTS = ["Tell me how you feel about cats.", "Hi"]
LR = 1e-2


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule reward that differs between responses: their length in characters / 10."""
    return [len(r) / 10 for r in responses]


def peft_name(tp_layer: str, kind: str, adapter: str) -> str:
    """``layers.0.attention.wq`` -> the PEFT bundle's ``lm.base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.actor.weight``."""
    _, index, _, proj = tp_layer.split(".")
    return f"lm.base_model.model.model.layers.{index}.{HF_NAMES[proj]}.lora_{kind}.{adapter}.weight"


def tp_lora_weights(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The TP model's LoRA weights under the PEFT bundle's names."""
    from rlhf.tp.lora import lora_layers

    return {
        peft_name(name, kind, adapter): getattr(layer, f"lora_{kind}").weight
        for name, layer in lora_layers(model).items()
        for kind in ("A", "B")
    }


def build_bundles(model_dir, spec: LoraSpec):
    """The PEFT bundle and the TP bundle holding the same base, LoRA weights and value head."""
    from rlhf.ppo.peft_models import build_peft_policy_models
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers
    from rlhf.tp.ppo_models import TPPolicyModels

    peft = build_peft_policy_models(
        str(model_dir), actor=spec, critic=spec, reward_adapter=None, critic_init="sft"
    )
    cpu = torch.device("cpu")
    actor = load_tp_model(str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.float32)
    critic = load_tp_model(
        str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.float32, scalar_head=True
    )
    generator = torch.Generator().manual_seed(7)
    for model in (actor, critic):
        apply_lora(model, spec)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    critic.v_head.weight.requires_grad_(True)
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for adapter, model in (("actor", actor), ("critic", critic)):
            for name, weight in tp_lora_weights(model, adapter).items():
                params[name].copy_(weight)
        critic.v_head.weight.copy_(peft.value_head.weight)
    tp = TPPolicyModels(actor, critic, actor_source=str(model_dir), critic_source=str(model_dir))
    return peft, tp


def session_for(backend, models, engine, tokenizer, tmp_path):
    ppo = PPOArguments(
        generation_engine=engine,
        max_response_length=6, temperature=1.0, top_k=1, per_device_mini_train_batch_size=2, kl_penalty_beta=0.1,
        actor_lr=LR, critic_lr=LR, pretrain_batch_size=2,
    )  # fmt: skip
    args = PPOTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, seed=0)
    prompts = PromptSet([tokenizer(p)["input_ids"] for p in PROMPTS], PROMPTS)
    parts = SessionParts(
        backend=backend, models=models, scorer=RuleScorer(length_reward, "length"), tokenizer=tokenizer,
        prompts=prompts, generator=rollout_generator(ppo, args, models.generation_model, tokenizer),
    )  # fmt: skip
    return assemble_session(parts, ppo, args, {})


def one_step(session):
    """Steps 1-5 (a rollout), step 6 on its one mini-batch, and the optimizer step."""
    state, metrics = TrainState(), MetricsAccumulator()
    torch.manual_seed(0)
    buffer = collect_rollout(session, state, metrics)
    session.models.train(True)
    losses = {k: float(v) for k, v in ppo_mini_batch_step(session, buffer, state).items()}
    norms = session.backend.step(
        session.optimizers, session.schedulers, session.models.parameter_groups(), session.args.max_grad_norm
    )
    return buffer, losses, norms


@pytest.mark.parametrize("peft_engine", ["hf", "static"])
def test_one_ppo_step_matches_across_backends(tiny_llama, world_of_one, tmp_path, peft_engine):
    from rlhf.backend.accelerate import AccelerateBackend
    from rlhf.models import load_tokenizer
    from rlhf.tp.backend import TPBackend

    tokenizer = load_tokenizer(str(tiny_llama), padding_side="left")
    peft, tp = build_bundles(tiny_llama, LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS))
    tp_backend = TPBackend(0)
    for model in (tp.actor, tp.critic):
        tp_backend.prepare(model)
    before = {k: v.detach().clone() for k, v in tp_lora_weights(tp.actor, "actor").items()}

    peft_buffer, peft_losses, peft_norms = one_step(
        session_for(AccelerateBackend(), peft, peft_engine, tokenizer, tmp_path / "peft")
    )
    tp_buffer, tp_losses, tp_norms = one_step(
        session_for(tp_backend, tp, "static", tokenizer, tmp_path / "tp")
    )

    # the rollout: same responses (top-1 sampling), then old log-probs, values, advantages, returns
    assert torch.equal(peft_buffer.sequences.input_ids, tp_buffer.sequences.input_ids)
    assert torch.equal(peft_buffer.sequences.attention_mask, tp_buffer.sequences.attention_mask)
    for key in ("old_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(
            getattr(peft_buffer, key),
            getattr(tp_buffer, key),
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, key=key: f"{key}: {m}",
        )
    assert peft_buffer.advantages.abs().sum() > 0  # the rewards differ, so the step is not trivial

    # the losses of the one mini-batch and the gradient norm of each parameter group
    for key in (
        "loss/policy",
        "loss/value",
        "policy/entropy",
        "policy/approxkl",
        "policy/clipfrac",
        "value/clipfrac",
    ):
        assert tp_losses[key] == pytest.approx(peft_losses[key], rel=1e-4, abs=1e-6), key
    assert peft_norms.keys() == tp_norms.keys() == {"actor", "critic"}
    for name in peft_norms:
        assert tp_norms[name] == pytest.approx(peft_norms[name], rel=1e-4), name
        assert peft_norms[name] > 0

    # the updated LoRA weights (Adam's first step moves each weight by about ±lr: a sign that differs shows)
    peft_params = dict(peft.named_parameters())
    for adapter, model in (("actor", tp.actor), ("critic", tp.critic)):
        for name, weight in tp_lora_weights(model, adapter).items():
            torch.testing.assert_close(
                peft_params[name], weight, atol=0.05 * LR, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
            )
    torch.testing.assert_close(peft.value_head.weight, tp.critic.v_head.weight, atol=0.05 * LR, rtol=0)
    moved = [
        (weight - before[name]).abs().max() for name, weight in tp_lora_weights(tp.actor, "actor").items()
    ]
    assert min(moved) > 0.5 * LR  # every LoRA matrix took a real step
