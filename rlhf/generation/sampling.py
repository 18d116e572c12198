"""The next token from one step's logits, on the device: EOS suppression, temperature, top-k, top-p.

The processing order and the top-k / top-p rules are those of Hugging Face ``generate`` (a minimum-length
processor, then the temperature, top-k and top-p warpers), so the two engines sample from the same
distribution. A draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` per token (an exact sample of ``p``, as in
gpt-fast): unlike ``torch.multinomial`` it never makes the host wait for the device.

The log-probability returned with each token is that of the policy that sampled, ``log softmax(logits / T)``
before EOS suppression and before top-k/top-p, as the PPO loss reads it (``temperature <= 0``: greedy, and
the log-probs are those at ``T = 1``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.generation.base import SamplingConfig, eos_ids


def suppress_token(scores: torch.Tensor, token_id: int | tuple[int, ...] | None) -> torch.Tensor:
    """``scores`` [B, V] with the column of ``token_id`` (one id or several) set to -inf, in place (the EOS
    ids before ``min_new_tokens``)."""
    for column in eos_ids(token_id):
        scores[:, column] = float("-inf")
    return scores


def filter_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest scores of each row (and any tied with the k-th), -inf elsewhere. [B, V]."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # [B, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def filter_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``, -inf elsewhere.

    A token goes when the tokens less likely than it (itself included) hold at most ``1 - top_p`` of the
    mass (Hugging Face's rule); the most likely token always stays. [B, V] -> [B, V].
    """
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] -> [B] long: argmax(p / E), E ~ Exp(1) i.i.d. per token."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # 0 / 0 would be NaN for a zero-probability token
    return (probs / noise).argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    step: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next tokens and their log-probs. logits [B, V] -> (tokens [B] long, logprobs [B] float32).

    ``step`` counts the tokens already generated: EOS is suppressed while ``step < min_new_tokens``.
    ``sync`` replaces the drawn tokens before their log-probs are read (tensor-parallel ranks take rank 0's,
    so a rank whose random state differs still returns the log-probs of the tokens it keeps).
    """
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    scores = logits.float() / temperature  # [B, V], a new tensor: the in-place edits below stay local
    logprobs = torch.log_softmax(scores, dim=-1)
    if step < sampling.min_new_tokens:
        suppress_token(scores, sampling.eos_token_id)
    if sampling.temperature <= 0:
        tokens = scores.argmax(dim=-1)
    else:
        scores = filter_top_p(filter_top_k(scores, sampling.top_k), sampling.top_p)
        tokens = draw(scores.softmax(dim=-1), generator)
    if sync is not None:
        tokens = sync(tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
