"""RMSNorm as one ``F.rms_norm`` outside autocast (:mod:`rlhf.models.fused_rms_norm`) against the Hugging Face
module it replaces, and the stages that build their models with it."""

from __future__ import annotations

import copy
import types
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rlhf.models.fused_rms_norm import use_fused_rms_norm
from rlhf.models.lora import LoraSpec
from rlhf.ppo.peft_models import build_peft_policy_models
from rlhf.training.trainable import make_trainable


def norm_pair(dtype: torch.dtype) -> tuple[LlamaRMSNorm, LlamaRMSNorm]:
    plain = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    fused = copy.deepcopy(plain)
    assert use_fused_rms_norm(fused) == 1
    return plain, fused


def test_values_and_gradients_equal_the_module_in_float32():
    plain, fused = norm_pair(torch.float32)
    x = torch.randn(3, 5, 32, requires_grad=True)
    x_fused = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, 32)
    plain(x).backward(grad)
    out = fused(x_fused)
    out.backward(grad)
    torch.testing.assert_close(out, plain(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_fused.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)


def test_in_bf16_within_one_rounding_of_the_module():
    plain, fused = norm_pair(torch.bfloat16)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    out, expected = fused(x), plain(x)
    assert out.dtype == torch.bfloat16
    # the module rounds x / rms(x) to bf16 before the weight, then the product; the fused call rounds once
    assert ((out.float() - expected.float()).abs() <= 3 * 2**-8 * expected.float().abs()).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_the_call_leaves_it_only_where_the_dtypes_agree(x_dtype):
    """CUDA autocast would run rms_norm in float32 with casts around it; an input in another dtype than the
    weight keeps the module's own forward."""
    plain, fused = norm_pair(torch.bfloat16)
    seen, rms_norm = [], F.rms_norm

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return rms_norm(*args, **kwargs)

    x = torch.randn(4, 32).to(x_dtype)
    with patch.object(F, "rms_norm", recording), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), plain(x)
    assert seen == ([False] if x_dtype == torch.bfloat16 else [])
    assert out.dtype == expected.dtype
    if x_dtype == torch.float32:
        assert torch.equal(out, expected)


def test_a_model_keeps_its_logits_copies_and_checkpoints(tiny_llama, tmp_path):
    ids = torch.randint(4, 200, (2, 10))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert use_fused_rms_norm(model) == 2 * 2 + 1  # two per layer and the final norm
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        copied.model.norm.weight.mul_(2.0)  # the copy's norms read the copy's weights
        assert not torch.allclose(copied(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def fused_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, LlamaRMSNorm) and isinstance(m.__dict__.get("forward"), types.MethodType)
    ]


@pytest.mark.parametrize("stage", ["sft-lora", "sft-full", "ppo"])
def test_the_stages_build_their_models_with_it(tiny_llama, stage):
    spec = LoraSpec(4, 8.0, 0.0, ["q_proj", "v_proj"])
    if stage == "ppo":
        full = LoraSpec(-1, 8.0, 0.0, [])
        bundle = build_peft_policy_models(
            str(tiny_llama), actor=spec, critic=full, reward_adapter=None, critic_init="sft"
        )
        models = [bundle.lm, bundle.critic_full]
    else:
        lora = spec if stage == "sft-lora" else LoraSpec(-1, 8.0, 0.0, [])
        models = [make_trainable(AutoModelForCausalLM.from_pretrained(tiny_llama), lora)]
    for model in models:
        assert len(fused_norms(model)) == 5


def test_a_pickled_norm_reloads_with_its_class_forward(tmp_path):
    """A bound method pickles as ``getattr(norm, "forward")``: the reloaded norm runs its class's forward,
    the same values (torch.save of whole modules is the user's choice; checkpoints are state dicts)."""
    norm = LlamaRMSNorm(8)
    use_fused_rms_norm(torch.nn.Sequential(norm))
    x = torch.randn(2, 8)
    torch.save(norm, tmp_path / "norm.pt")
    loaded = torch.load(tmp_path / "norm.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), norm(x))
