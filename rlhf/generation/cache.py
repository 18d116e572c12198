"""The static KV cache: buffers allocated once per run, written in place, masked by per-row positions.

Layout: for each layer, keys and values ``[B_max, Hkv, S, hd]`` (``B_max`` generation rows, ``S`` slots =
prompt width + new tokens, ``Hkv`` key-value heads on this rank, ``hd`` head dim), plus one
``key_positions [B_max, S]`` long: the RoPE position of the token in each slot, -1 for an empty slot or a
pad. A step writes its tokens at the same slots in every row (``slots [T]``: the prompt's columns, then one
column per new token), so left-padded rows of different lengths share one write index, and the positions
alone say which keys a query may see: real keys at or before its own position (and, with a sliding window,
fewer than ``window`` positions behind). Nothing grows during generation: every step attends over all
``S`` slots, so a decode step has the same shapes every time (what a CUDA graph needs).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def attention_bias(
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    query_slots: torch.Tensor,
    window: int | None,
    n_rep: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive attention mask of one step, laid out for grouped-query attention.

    key_positions [B, S] (-1: empty or pad), query_positions [B, T] (-1: pad), query_slots [T] (where the
    queries' own keys are) -> [B, 1, n_rep * T, S] of 0 (attend) and -inf, rows ordered (head in group,
    query) as :func:`rlhf.generation.attention.grouped_attention` folds the query heads. A query sees real
    keys whose position is at most its own (and, with ``window``, more than ``position - window``); every
    query also sees its own slot, so pad queries stay finite (their outputs are never read).
    """
    keys = key_positions[:, None, :]  # [B, 1, S]
    queries = query_positions[:, :, None]  # [B, T, 1]
    allowed = (keys >= 0) & (keys <= queries)  # [B, T, S]
    if window is not None:
        allowed &= queries - keys < window
    slots = torch.arange(key_positions.shape[1], device=key_positions.device)
    allowed |= slots[None, None, :] == query_slots[None, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    batch, n_new, n_slots = bias.shape
    return (
        bias[:, None, None].expand(batch, 1, n_rep, n_new, n_slots).reshape(batch, 1, n_rep * n_new, n_slots)
    )


class StaticKVCache:
    """Keys, values and key positions of ``max_batch`` rows x ``max_len`` slots for every layer."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_positions = torch.full((max_batch, max_len), -1, dtype=torch.long, device=device)
        self.max_batch, self.max_len, self.dtype, self.device = max_batch, max_len, dtype, device
        self.bias: dict[int | None, torch.Tensor] = {}  # this step's masks, per sliding window
        logger.info(
            "static KV cache: %d layers x K,V [%d rows, %d kv heads, %d slots, %d dims] %s = %.1f MiB (%s)",
            n_layers, max_batch, n_kv_heads, max_len, head_dim, str(dtype).removeprefix("torch."),
            self.nbytes / 2**20, device,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            batch <= self.max_batch
            and length <= self.max_len
            and (dtype, device) == (self.dtype, self.device)
        )

    def reset(self, batch: int) -> None:
        """Empty rows ``0..batch-1`` (the keys stay; their positions of -1 hide them)."""
        self.key_positions[:batch].fill_(-1)

    def begin_step(
        self, positions: torch.Tensor, slots: torch.Tensor, windows: set[int | None], n_rep: int
    ) -> None:
        """Record the positions of this step's tokens (positions [B, T], slots [T]) and build its masks."""
        batch = positions.shape[0]
        self.key_positions[:batch].index_copy_(1, slots, positions)
        self.bias = {
            w: attention_bias(self.key_positions[:batch], positions, slots, w, n_rep, self.dtype)
            for w in windows
        }

    def write(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at ``slots`` [T] of ``layer``; return all keys, values [B, Hkv, S, hd]."""
        batch = k.shape[0]
        keys, values = self.k[layer][:batch], self.v[layer][:batch]
        keys.index_copy_(2, slots, k.to(self.dtype))
        values.index_copy_(2, slots, v.to(self.dtype))
        return keys, values
