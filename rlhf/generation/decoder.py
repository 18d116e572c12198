"""The decode-step interface a model side implements for the engine, and the step every side shares.

``step(tokens, positions, slots, cache) -> logits`` runs a prefill chunk or one new token per row through
the model against the static cache (:mod:`rlhf.generation.cache`) and returns the logits of the last
column. A model side (:mod:`rlhf.generation.hf_decoder`, :mod:`rlhf.generation.tp_decoder`) only says
where its pieces are: the embedding, RoPE, per layer the norms, the q/k/v/o projections (called as modules,
so PEFT LoRA layers and the TP LoRA hooks apply, unmerged) and the MLP, and the final norm + LM head. The
layer loop, the cache writes and the attention are written once, here and in
:mod:`rlhf.generation.attention`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.generation.attention import grouped_attention
from rlhf.generation.cache import StaticKVCache
from rlhf.models.rope import apply_rope, signed_sin

Module = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerParts:
    """One decoder layer as the engine runs it (heads counted on this rank)."""

    attention_norm: Module
    q_proj: Module
    k_proj: Module
    v_proj: Module
    o_proj: Module
    mlp_norm: Module
    mlp: Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float | None = None  # None: 1 / sqrt(head_dim)
    window: int | None = None  # sliding window in positions, None = full causal attention
    qkv_proj: Module | None = None  # q, k and v in one projection (then q/k/v_proj are not called)


class Decoder(ABC):
    """A model side of the engine: see the module docstring.

    ``module`` is what the steps read weights from (its parameters are checked before a CUDA graph
    replays); ``capturable`` is false when a step has data-dependent shapes (mixture-of-experts routing),
    which then runs eagerly on GPU too.
    """

    module: nn.Module
    layers: list[LayerParts]
    capturable: bool = True

    @abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden states [B, T, D]."""

    @abstractmethod
    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (>= 0) -> cos, sin [B, T, hd] in h's dtype."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: h [B, D] -> logits [B, V] (the same on every rank)."""

    @abstractmethod
    def state_key(self) -> tuple:
        """What a captured graph bakes in besides the weights: active adapters, hooks, train/eval mode."""

    def refresh(self) -> None:
        """Bring weights the side keeps of its own up to date with the model (before each generation);
        nothing to do for a side that reads the model's own weights."""
        return None

    def generating(self) -> AbstractContextManager:
        """Entered around a generation's steps (prefill and decode, graph capture included), after
        :meth:`refresh`; nothing for a side that needs no state there."""
        return nullcontext()

    def sync(self, tokens: torch.Tensor) -> torch.Tensor:
        """Make every rank hold rank 0's sampled tokens [B] (identity on one process)."""
        return tokens

    @property
    def n_kv_heads(self) -> int:
        return self.layers[0].n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    @property  # the layers are fixed after __init__; read at every step
    def n_rep(self) -> int:
        return self.layers[0].n_heads // self.layers[0].n_kv_heads

    @property
    def windows(self) -> set[int | None]:
        return {layer.window for layer in self.layers}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations have during generation: autocast's when it is on now, else the weights'."""
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.dtype

    def new_cache(self, max_batch: int, max_len: int, dtype: torch.dtype) -> StaticKVCache:
        return StaticKVCache(
            len(self.layers), self.n_kv_heads, self.head_dim, max_batch, max_len, dtype, self.device
        )

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: StaticKVCache
    ) -> torch.Tensor:
        """tokens, positions [B, T] (position -1 marks a pad), slots [T] -> logits [B, V] of the last column.

        Writes the tokens' keys and values at ``slots`` of every layer's cache rows ``0..B-1``.
        """
        cache.begin_step(positions, slots, self.windows, self.n_rep)
        h = self.embed(tokens)
        cos, sin = self.rope(h, positions.clamp(min=0))
        sin_signed = signed_sin(sin)
        for index, layer in enumerate(self.layers):
            h = h + self._attention(index, layer, layer.attention_norm(h), cos, sin_signed, slots, cache)
            out = layer.mlp(layer.mlp_norm(h))
            h = h + (out[0] if isinstance(out, tuple) else out)
        return self.head(h[:, -1])

    @staticmethod
    def _attention(
        index: int,
        layer: LayerParts,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        slots: torch.Tensor,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """x [B, T, D] -> the attention block's output [B, T, D], through the cache of layer ``index``
        (``sin_signed``: :func:`rlhf.models.rope.signed_sin` of the RoPE sine)."""
        batch, n_new, _ = x.shape
        heads, kv_heads, head_dim = layer.n_heads, layer.n_kv_heads, layer.head_dim
        if layer.qkv_proj is not None:  # one GEMM, then one RoPE pass over the q and k heads together
            qkv = layer.qkv_proj(x).view(batch, n_new, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin_signed)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        else:
            q = layer.q_proj(x).view(batch, n_new, heads, head_dim).transpose(1, 2)  # [B, H, T, hd]
            k = layer.k_proj(x).view(batch, n_new, kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
            v = layer.v_proj(x).view(batch, n_new, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin_signed), apply_rope(k, cos, sin_signed)
        keys, values = cache.write(index, slots, k, v)  # [B, Hkv, S, hd]
        out = grouped_attention(q.to(keys.dtype), keys, values, cache.bias[layer.window], layer.scale)
        return layer.o_proj(out.transpose(1, 2).reshape(batch, n_new, heads * head_dim))
