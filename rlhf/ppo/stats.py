"""Masked statistics and token log-probabilities: the building blocks of every PPO quantity.

Shapes: ``B`` sequences, ``R`` response positions, ``V`` vocabulary. A mask is 1.0 on real response tokens
(up to and including the first EOS) and 0.0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]  # sums a small tensor over processes (identity on one)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1: sum(v·m) / sum(m), over ``dim`` or over everything.

    values, mask: [B, R] (any equal shapes). Returns a scalar, or the tensor reduced over ``dim``.
    ``count`` (a scalar, with ``dim=None``) replaces sum(m) as the divisor: data-parallel losses divide by
    the mini-batch's tokens per process (:func:`tokens_per_process`), so every token of the global
    mini-batch weighs the same once the processes' gradients are averaged.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        divisor = mask.sum().clamp(min=1.0) if count is None else count.to(values.dtype).clamp(min=1e-12)
        return (values * mask).sum() / divisor
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def tokens_per_process(mask: torch.Tensor, reduce_sum: ReduceSum, world_size: int) -> torch.Tensor:
    """The masked tokens of all processes' mini-batches, divided by the number of processes: the divisor
    of a token mean whose gradient is averaged over processes (on one process, this one's token count).
    mask: [B, R] -> float scalar."""
    return reduce_sum(mask.float().sum()) / world_size


def global_masked_moments(
    values: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the masked entries of **all processes**, as of the gathered entries in one
    process (variance Bessel-corrected when ``unbiased``). values, mask: [N, R] (or [N]).

    Two passes, as :func:`masked_var`: Σm and Σv·m give the mean, then Σ(v − mean)²·m the variance; with
    an identity ``reduce_sum`` every operation is the one ``masked_var`` runs, so one process gets its
    result bit for bit."""
    mask = mask.to(values.dtype)
    first = reduce_sum(torch.stack([(values * mask).sum(), mask.sum()]))
    total, count = first[0], first[1]
    mean = total / count.clamp(min=1.0)
    var = reduce_sum(((values - mean) ** 2 * mask).sum()) / count.clamp(min=1.0)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return mean, var


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected when ``unbiased``). values, mask: [B, R] -> scalar."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count > 1:
            var = var * count / (count - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(v - mean) / sqrt(var + eps) over the masked entries; with ``shift_mean=False`` the mean is kept.

    values, mask: [B, R] -> [B, R]. Entries outside the mask are returned as they are transformed, so
    callers multiply by the mask where that matters.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log π(token) under softmax(logits / temperature).

    logits: [B, R, V] (the logits that predict each response token), tokens: [B, R] -> [B, R].
    Sampling draws from softmax(logits / T), so the log-probabilities used for the PPO ratio and the KL
    penalty must use the same temperature.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H = -Σ_v p_v log p_v of softmax(logits / T) at each position. [B, R, V] -> [B, R]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(
    predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum | None = None
) -> torch.Tensor:
    """1 - Var(targets - predictions) / Var(targets) over the mask (1 = perfect critic, <= 0 = useless).

    predictions, targets, mask: [B, R] -> scalar. With ``reduce_sum`` the variances are over the masked
    entries of all processes (:func:`global_masked_moments`; without, this process's, as :func:`masked_var`).
    """
    reduce_sum = reduce_sum or (lambda total: total)
    var_targets = global_masked_moments(targets, mask, reduce_sum, unbiased=False)[1]
    var_error = global_masked_moments(targets - predictions, mask, reduce_sum, unbiased=False)[1]
    return 1.0 - var_error / var_targets.clamp(min=1e-8)
