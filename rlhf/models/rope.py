"""Rotary position embedding in the Hugging Face (rotate-half) layout, in three kernels.

``x * cos + rotate_half(x) * sin`` is five kernels (two products, a negation, a concatenation, a sum);
since ``rotate_half(x) * sin == roll(x, hd / 2) * signed_sin(sin)`` (the halves swapped, the sign moved onto
the sine, once per forward), it is a product, a roll and an ``addcmul``. Used by the rollout engine's decode
step and the tensor-parallel model; equal to Hugging Face's ``apply_rotary_pos_emb`` to float rounding
(``tests/test_generation_parts.py``).
"""

from __future__ import annotations

import torch

# RoPE types whose frequencies depend on the longest position seen (Hugging Face rescales them on the host
# per call): no CUDA graph of a decode step, and decode steps rotate early keys differently from one forward
HOST_ROPE = ("dynamic", "longrope")


def rope_type(model: torch.nn.Module) -> str:
    """The RoPE type of a Hugging Face causal LM, also under a PEFT wrapper (``default``, ``linear``,
    ``dynamic``, ``longrope``, ...); ``default`` for a model without HF's rotary module (the TP model)."""
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    rotary = getattr(getattr(lm, "model", None), "rotary_emb", None)
    return str(getattr(rotary, "rope_type", "default"))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine of RoPE [..., hd] with its first half negated, for :func:`apply_rope` (once per step)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [B, heads, T, hd], cos and sin_signed [B, T, hd] (the heads
    dimension is added here) or already [B, 1, T, hd]."""
    if cos.dim() == x.dim() - 1:
        cos, sin_signed = cos[:, None], sin_signed[:, None]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)
