"""PEFT's cast of a LoRA layer's input to the adapter's float32, skipped under autocast
(:func:`rlhf.models.lora.skip_input_casts_under_autocast`): the same numbers, fewer passes over activations."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from rlhf.models.lora import LoraSpec, skip_input_casts_under_autocast
from rlhf.ppo.peft_models import build_peft_policy_models
from rlhf.training.trainable import make_trainable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_base_with_adapter(model_dir, skip: bool) -> torch.nn.Module:
    """A bf16 base with a float32 LoRA adapter (PEFT's default on a half-precision base), B non-zero."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    if skip:
        assert skip_input_casts_under_autocast(model) == 7 * model.config.num_hidden_layers
    return model


class CountCasts(TorchDispatchMode):
    casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        CountCasts.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


def loss_grads_and_casts(model, ids):
    CountCasts.casts = 0
    with torch.autocast("cpu", dtype=torch.bfloat16), CountCasts():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, CountCasts.casts


def test_under_autocast_the_loss_and_gradients_are_bit_identical_with_fewer_casts(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    default_loss, default_grads, default_casts = loss_grads_and_casts(
        bf16_base_with_adapter(tiny_llama, False), ids
    )
    loss, grads, casts = loss_grads_and_casts(bf16_base_with_adapter(tiny_llama, True), ids)
    assert torch.equal(loss, default_loss)
    assert grads.keys() == default_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    assert all(torch.equal(grads[n], default_grads[n]) for n in grads)
    # at least the forward's round trip per projection (to float32 and back); the backward loses most of its
    # own (the input's gradient from float32 back to bf16): 129 -> 79 casts here
    assert default_casts - casts >= 2 * 7 * 2


def test_outside_autocast_the_input_is_still_cast_to_the_adapters_dtype(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        expected = bf16_base_with_adapter(tiny_llama, False)(input_ids=ids).logits
        logits = bf16_base_with_adapter(tiny_llama, True)(input_ids=ids).logits  # bf16 input, float32 adapter
    assert torch.equal(logits, expected)


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")]


def test_the_stages_build_their_adapters_to_skip_the_casts_only_under_autocast(tiny_llama):
    sft = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraSpec(4, 8.0, 0.0, TARGETS))
    ppo = build_peft_policy_models(
        str(tiny_llama), actor=LoraSpec(4, 8.0, 0.0, TARGETS), critic=LoraSpec(4, 8.0, 0.0, TARGETS),
        reward_adapter=None, critic_init="sft",
    ).lm  # fmt: skip
    for model in (sft, ppo):
        layers = lora_layers(model)
        assert len(layers) == 7 * 2
        assert all(bool(layer.cast_input_dtype_enabled) for layer in layers)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not any(bool(layer.cast_input_dtype_enabled) for layer in layers)
