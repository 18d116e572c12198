"""PPO losses (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") and the pretraining mix.

Shapes: ``B`` sequences, ``R`` response positions; every mean is a masked mean over response tokens, except
the policy loss, whose per-token terms are aggregated by ``--loss_agg_mode`` (:func:`aggregate_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.ppo.kl import masked_kl_estimate
from rlhf.ppo.stats import masked_mean

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_length: int | None = None,
    token_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scalar from per-token loss terms (``--loss_agg_mode``, veRL's names). per_token, mask: [B, R].

    - ``token-mean``: Σ_{i,t} l_it / Σ_{i,t} m_it, every token of the mini-batch weighs the same (DAPO, Yu et
      al. 2025; our PPO's default, unchanged);
    - ``seq-mean-token-mean``: 1/B Σ_i (Σ_t l_it / |o_i|), each response weighs the same (GRPO, Shao et al.
      2024, eq. 3), so tokens of long responses count less;
    - ``seq-mean-token-sum-norm``: 1/B Σ_i Σ_t l_it / L with a constant L (``norm_length``, the maximum
      response length): Dr. GRPO (Liu et al. 2025), which removes GRPO's length bias.

    ``token_count`` replaces Σ m_it in ``token-mean``: with data parallelism, the mini-batch's tokens per
    process (:func:`rlhf.ppo.stats.tokens_per_process`), so that every token of the global mini-batch
    weighs the same once the gradients are averaged (the sequence means need no such care: every process
    holds as many responses).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return masked_mean(per_token, mask, count=token_count)
    sums = (per_token * mask).sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        return (sums / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum-norm":
        if not norm_length or norm_length <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_length > 0 (the maximum response length)")
        return sums.mean() / norm_length
    raise ValueError(f"unknown loss aggregation {mode!r} (expected one of {', '.join(LOSS_AGG_MODES)})")


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # share of tokens where the ratio clip is active and gives the larger loss
    approxkl: torch.Tensor  # ½·mean((log π - log π_old)²)


@dataclass
class ValueLoss:
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # share of tokens where the value clip is active and gives the larger loss


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_count: torch.Tensor | None = None,
) -> PolicyLoss:
    """Clipped surrogate, PPO paper eq. 7, as a loss to minimise:

    L = agg_t max(-Â_t·ρ_t, -Â_t·clip(ρ_t, 1-ε, 1+ε)),  ρ_t = exp(log π(a_t) - log π_old(a_t)),

    with ``agg`` the token aggregation of :func:`aggregate_tokens` (default: the mean over all tokens).
    logprobs, old_logprobs, advantages, mask: [B, R]. ``clipfrac`` and ``approxkl`` are token means (of
    this process's tokens). ``token_count``: see :func:`aggregate_tokens`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate_tokens(torch.maximum(unclipped, clipped), mask, agg_mode, norm_length, token_count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio.square(), mask)
    return PolicyLoss(loss, clipfrac, approxkl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    token_count: torch.Tensor | None = None,
) -> ValueLoss:
    """Clipped value loss: ½·mean_t max((V_t - R_t)², (V_clip,t - R_t)²),

    V_clip = clip(V, V_old - ε, V_old + ε) (the PPO2 baselines / InstructGPT critic loss).
    values, old_values, returns, mask: [B, R]; ``token_count`` divides the sum instead of this process's
    tokens (data parallelism: :func:`aggregate_tokens`).

    The clip is written as a clamp of V itself (TRL's form), not V_old + clamp(V - V_old, -ε, ε): inside
    the band the clamped value is then V bit for bit, so ``clipfrac`` counts only tokens where the clip
    is active and makes the error larger, never floating-point rounding of V_old + (V - V_old).
    """
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask, count=token_count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss, clipfrac)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    token_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(π_θ || π_ref) as a loss term (``--use_kl_loss``; GRPO, Shao et al. 2024, eq. 4):

    mean_t [π_ref/π_θ − log(π_ref/π_θ) − 1] (the k3 estimator, unbiased and ≥ 0), differentiable in π_θ.
    The loop adds β times it to the actor loss. logprobs, ref_logprobs, mask: [B, R] -> scalar;
    ``token_count`` as in :func:`aggregate_tokens`.

    The log-ratio is masked before k3's exp (:func:`rlhf.ppo.kl.masked_kl_estimate`): a pad's log-prob after
    EOS would overflow it, and NaN the loss and its gradient.
    """
    return masked_mean(masked_kl_estimate(logprobs, ref_logprobs, mask, "k3"), mask, count=token_count)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean token entropy H(π(·|s_t)) over the mask; the total loss subtracts coef·H. [B, R] -> scalar;
    ``token_count`` as in :func:`aggregate_tokens`."""
    return masked_mean(entropy, mask, count=token_count)


def pretrain_weight(step: int, weight: float, warmup_steps: int) -> float:
    """w_pt(t) = weight · min(1, t / warmup_steps): the pretraining-loss weight, warmed up from 0.

    InstructGPT's PPO-ptx objective (Ouyang et al. 2022, eq. 2) adds γ·E[log π(x_pretrain)]; the warm-up
    keeps the LM term from dominating while the value estimates are still poor.
    """
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)
