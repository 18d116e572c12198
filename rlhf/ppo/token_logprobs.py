"""Token log-probabilities and entropies from hidden states, a chunk of positions at a time.

A PPO forward over B sequences of R response tokens with a V-word vocabulary would otherwise hold
``[B, R, V]`` float32 logits (and their softmax) for the backward pass: 64 × 256 × 32000 × 4 bytes = 2.1 GB for
one 1.1B-model mini-batch, several times over. Here the output head runs on ``chunk_size`` positions at a
time and, when gradients are needed, under activation checkpointing, so only one chunk's logits exist at
once in the forward and in the backward (they are recomputed there). The values are those of
:func:`rlhf.ppo.stats.logprobs_from_logits` / :func:`rlhf.ppo.stats.entropy_from_logits` on the full logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden [B, C, H] -> logits [B, C, V]
CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk (its log-softmax and softmax are as large again)


def positions_per_chunk(batch_size: int, vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's float32 logits ``[batch_size, C, vocab_size]`` take about
    ``budget_bytes`` (at least one position): 64 for 32 rows of a 32000-word vocabulary."""
    return max(1, budget_bytes // (4 * vocab_size * max(batch_size, 1)))


def _chunk(
    head: Head,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # [B, C, V], one chunk only
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logprobs, torch.zeros_like(logprobs)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs, -(logp.exp() * logp).sum(-1)  # the same operations as the unchunked functions


def chunked_token_logprobs(
    head: Head,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    context_fn: Callable[[], tuple[Any, Any]] | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / T) at ``tokens``, and optionally the entropy, chunked over positions.

    head: hidden [B, C, H] -> logits [B, C, V] (the model's output layer); hidden: [B, R, H], the states
    that predict each of ``tokens`` [B, R]. Returns (log-probs [B, R] float32, entropy [B, R] float32 or
    ``None``). Differentiable with respect to ``hidden`` and the head's parameters; with gradients enabled each
    chunk is checkpointed so its logits are recomputed in the backward instead of kept, under
    ``context_fn``'s recompute context when given (a head with adapters: the one active in the forward).
    ``entropy_grad=False``: the entropy is a metric only (a loss with entropy coefficient 0), computed
    without a graph: no backward through a second ``[B, C, V]`` chain, nothing of it recomputed.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    logprobs, entropies = [], []
    needs_grad = torch.is_grad_enabled()
    for start in range(0, hidden.shape[1], chunk_size):
        piece = (head, hidden[:, start : start + chunk_size], tokens[:, start : start + chunk_size])
        if needs_grad:
            extra = {} if context_fn is None else {"context_fn": context_fn}
            lp, ent = checkpoint(
                _chunk, *piece, temperature, with_entropy, entropy_grad, use_reentrant=False, **extra
            )
        else:
            lp, ent = _chunk(*piece, temperature, with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = hidden.new_zeros(tokens.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    return torch.cat(logprobs, 1), (torch.cat(entropies, 1) if with_entropy else None)
