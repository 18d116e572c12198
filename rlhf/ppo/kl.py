"""KL penalty: per-token estimators, KL-shaped rewards and the adaptive KL coefficient.

The per-token penalty follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences")
and Ouyang et al. 2022 (InstructGPT, eq. 2): the reward of a response y to prompt x is
R(x, y) = r_φ(x, y) - β · log(π(y|x) / π_ref(y|x)), spread over tokens as -β·KL_t at every token and the
score added at the last one. The estimators of KL_t from one sample (Schulman, "Approximating KL
divergence", 2020), with ``log_ratio = log π(y_t) - log π_ref(y_t)``:

- ``k1``: log_ratio (unbiased, can be negative),
- ``abs``: |log_ratio|,
- ``mse``: ½·log_ratio²,
- ``k3``: (ratio⁻¹ - 1) + log_ratio, i.e. exp(-log_ratio) - 1 + log_ratio (unbiased, always >= 0).
"""

from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "abs", "mse", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate. logprobs, ref_logprobs: [B, R] -> [B, R]."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected one of {', '.join(KL_ESTIMATORS)})")


def masked_kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """:func:`kl_estimate` on the masked tokens, 0 elsewhere. The log-probs are masked before the estimate,
    with ``where``: after EOS the policy's log-prob of a pad token can be below −88 (a peaked head at a low
    temperature), where k3's exp overflows, and inf · 0 is NaN (in a loss, in its gradient too), which
    masking afterwards cannot undo. logprobs, ref_logprobs, mask: [B, R] -> [B, R]."""
    keep = mask.bool()
    return kl_estimate(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs, 0.0), estimator)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask. [B, R] -> [B] (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards r_t = -β·KL_t, plus the sequence score at the last response token.

    scores: [B] (already clipped), kl: [B, R], mask: [B, R]. Returns (rewards [B, R], non_score [B, R]),
    both zero outside the mask.
    """
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


class FixedKLController:
    """β stays constant (``--kl_penalty_beta`` without ``--target_kl``)."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_samples: int) -> None:
        """No-op: the coefficient is fixed."""


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β ← β·(1 + K_β·e), e = clip(KL/KL_target - 1, -0.2, 0.2), K_β = n/horizon.

    ``current_kl`` is the mean per-sequence KL of the last rollout and ``n_samples`` its number of
    sequences; the coefficient rises when the policy drifts past the target and falls below it.
    """

    MAX_ERROR = 0.2  # the clip of e

    def __init__(self, beta: float, target: float, horizon: float) -> None:
        self.value = beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -self.MAX_ERROR), self.MAX_ERROR)
        self.value *= 1.0 + error * n_samples / self.horizon
