"""Masked statistics and token log-probabilities: the building blocks of every PPO quantity.

Shapes: ``B`` sequences, ``R`` response positions, ``V`` vocabulary. A mask is 1.0 on real response tokens
(up to and including the first EOS) and 0.0 on padding.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1: sum(v·m) / sum(m), over ``dim`` or over everything.

    values, mask: [B, R] (any equal shapes). Returns a scalar, or the tensor reduced over ``dim``.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


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


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(targets - predictions) / Var(targets) over the mask (1 = perfect critic, <= 0 = useless).

    predictions, targets, mask: [B, R] -> scalar.
    """
    var_targets = masked_var(targets, mask, unbiased=False)
    var_error = masked_var(targets - predictions, mask, unbiased=False)
    return 1.0 - var_error / var_targets.clamp(min=1e-8)
