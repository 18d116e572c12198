"""Attention over the static cache: grouped-query attention without copying keys, the SDPA backends (RoPE:
:mod:`rlhf.models.rope`).

Shapes: ``B`` rows, ``H`` query heads, ``Hkv`` key-value heads (``n_rep = H / Hkv`` query heads share one),
``T`` new tokens, ``S`` cache slots, ``hd`` head dim.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of q [B, H, T, hd] over k, v [B, Hkv, S, hd] -> [B, H, T, hd].

    The ``n_rep`` query heads of a group attend to the same key head, so they are folded into the query
    dimension (q as [B, Hkv, n_rep * T, hd]) instead of repeating the keys ``n_rep`` times in memory.
    ``bias`` [B, 1, n_rep * T, S] is additive (0 / -inf) in that folded order
    (:func:`rlhf.generation.cache.attention_bias`).
    """
    batch, n_heads, n_new, head_dim = q.shape
    n_kv = k.shape[1]
    folded = q.reshape(batch, n_kv, (n_heads // n_kv) * n_new, head_dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=bias, scale=scale)
    return out.reshape(batch, n_heads, n_new, head_dim)  # SDPA may return it non-contiguous (GPU)


def sdpa_backends(device: torch.device) -> AbstractContextManager:
    """On GPU: memory-efficient attention (takes our additive mask), flash where it applies, math as the
    last resort; never cuDNN, which re-plans for every new shape. On CPU: PyTorch's choice."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
