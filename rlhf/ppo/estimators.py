"""Advantage estimators: GAE with a learned critic, and the critic-free group and REINFORCE estimators.

Every function here is pure: tensors in, tensors out, shapes in the docstrings. The loop picks one estimator
by ``--advantage_estimator`` (:data:`ESTIMATORS`) and never branches on which one beyond that.

Notation: N sampled responses, R response positions, ``mask`` [N, R] is 1 on response tokens (up to and
including the first EOS). ``scores`` [N] is the clipped sequence score r_i of response i (after
``--missing_eos_penalty``), ``group_ids`` [N] the prompt each response was sampled for: the K responses to
one prompt (``--num_samples_per_prompt K``) form one group g.

- ``gae``:  Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV(s_{t+1}) − V(s_t) (Schulman et al. 2016), see
  :mod:`rlhf.ppo.advantages`; the only estimator that needs a critic.
- ``grpo``: A_i = (r_i − mean_g r) / (std_g r + ε) at every token of response i (Shao et al. 2024,
  "DeepSeekMath", eq. 3 outcome supervision).
- ``dr_grpo``: A_i = r_i − mean_g r (Liu et al. 2025, "Understanding R1-Zero-Like Training": no std division).
- ``rloo``: A_i = r_i − 1/(K−1) Σ_{j≠i} r_j (Ahmadian et al. 2024, "Back to Basics", leave-one-out baseline).
- ``reinforce_pp``: token rewards r_t = −β·KL_t plus the score at the last token, returns
  G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over all response tokens of all processes (Hu 2025, "REINFORCE++").
- ``reinforce_pp_baseline``: as ``reinforce_pp`` with r_i replaced by r_i − mean_g r first.

With the KL in the reward (no ``--use_kl_loss``), ``dr_grpo`` and ``rloo`` take the KL-penalised score
r_i − β·Σ_t KL_t (the RLOO paper's sequence reward; the baseline then removes the group's mean KL too).
``grpo`` normalises r_i alone and adds −β·Σ_t KL_t after, unscaled (OpenRLHF normalises first too): dividing the KL by
the group's score spread would turn a group that scored alike (std ≈ 0, common with rule rewards) into
unit-size advantages made of KL noise alone, whatever β.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.ppo.advantages import gae_advantages
from rlhf.ppo.kl import kl_shaped_rewards
from rlhf.ppo.stats import ReduceSum, global_masked_moments

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
NEEDS_CRITIC = frozenset({"gae"})
NEEDS_GROUPS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})
# Estimators whose advantage is one number per response (the KL enters through the score or a loss term).
SEQUENCE_LEVEL = frozenset({"grpo", "dr_grpo", "rloo"})


def group_stats(
    scores: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response statistics of its group: (mean_g r, std_g r, K_g), each [N].

    scores: [N] float, group_ids: [N] long (any labels; groups need not be contiguous). The std is the
    Bessel-corrected sample standard deviation (``torch.std`` of the group, as TRL and OpenRLHF use); it is 0
    for a group of one.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    values = scores.to(torch.float64)
    counts = torch.zeros(n_groups, dtype=torch.float64, device=scores.device).index_add_(
        0, index, torch.ones_like(values)
    )
    sums = torch.zeros_like(counts).index_add_(0, index, values)
    means = sums / counts
    squares = torch.zeros_like(counts).index_add_(0, index, (values - means[index]) ** 2)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    dtype = scores.dtype
    return means[index].to(dtype), std[index].to(dtype), counts[index].to(dtype)


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: A_i = (r_i − mean_g r) / (std_g r + ε), broadcast over the tokens of response i.

    scores: [N], group_ids: [N], mask: [N, R] -> advantages [N, R], zero outside the mask.
    """
    mean, std, _ = group_stats(scores, group_ids)
    return ((scores - mean) / (std + eps))[:, None] * mask


def dr_grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: A_i = r_i − mean_g r (no division by the group std). [N], [N], [N, R] -> [N, R]."""
    mean, _, _ = group_stats(scores, group_ids)
    return (scores - mean)[:, None] * mask


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i − 1/(K−1) Σ_{j≠i} r_j = K/(K−1)·(r_i − mean_g r). [N], [N], [N, R] -> [N, R].

    Needs K ≥ 2 in every group (the loop checks ``--num_samples_per_prompt`` before training)."""
    mean, _, count = group_stats(scores, group_ids)
    leave_one_out = (count * mean - scores) / (count - 1).clamp(min=1)
    return (scores - leave_one_out)[:, None] * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = Σ_{s≥t} γ^{s−t} r_s over the response. rewards, mask: [N, R] -> [N, R]."""
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def global_masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    reduce_sum: ReduceSum,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(v − mean) / sqrt(var + eps) with mean and (Bessel-corrected) variance over the masked entries of
    **all processes** (:func:`rlhf.ppo.stats.global_masked_moments`): equal to whitening the gathered
    tokens in one process, and on one process to :func:`rlhf.ppo.stats.masked_whiten` bit for bit.

    values, mask: [N, R] -> [N, R] (zero outside the mask). ``reduce_sum`` sums a small tensor over
    processes (the backend's all-reduce; identity on one process).
    """
    mean, var = global_masked_moments(values, mask, reduce_sum)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float, reduce_sum: ReduceSum
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: (advantages, returns), advantages = global whitening of G_t = Σ_{s≥t} γ^{s−t} r_s.

    token_rewards: [N, R] (−β·KL_t, plus the score — or its group-centred version for
    ``reinforce_pp_baseline`` — at the last token), mask: [N, R]."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return global_masked_whiten(returns, mask, reduce_sum), returns


def group_centred_scores(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """r_i − mean_g r: the score with its group's mean removed (``reinforce_pp_baseline``). [N] -> [N]."""
    mean, _, _ = group_stats(scores, group_ids)
    return scores - mean


def sequence_advantages(
    estimator: str, scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The per-response advantage of ``grpo``, ``dr_grpo`` or ``rloo`` broadcast over its tokens: [N, R]."""
    if estimator == "grpo":
        return grpo_advantages(scores, group_ids, mask)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(scores, group_ids, mask)
    if estimator == "rloo":
        return rloo_advantages(scores, group_ids, mask)
    raise ValueError(f"{estimator!r} is not a sequence-level estimator ({', '.join(sorted(SEQUENCE_LEVEL))})")


def mean_group_std(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean over groups of the within-group std of the scores (``reward/score_group_std``): 0 means every
    group's responses scored alike, and GRPO learns nothing from them. [N], [N] -> scalar."""
    _, std, count = group_stats(scores, group_ids)
    return (std / count).sum() / (1.0 / count).sum()


def zero_std_group_fraction(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Share of groups whose responses all scored the same (``reward/frac_zero_std``, TRL's
    ``frac_reward_zero_std``): their score advantages are 0 under every group estimator. [N], [N] -> scalar."""
    _, std, count = group_stats(scores, group_ids)
    alike = torch.isclose(std, torch.zeros_like(std)).to(scores.dtype)
    return (alike / count).sum() / (1.0 / count).sum()


@dataclass(frozen=True)
class EstimatorSettings:
    """What steps 4–5 need from the flags: ``--advantage_estimator``, ``--gamma``, ``--lam`` (GAE only),
    ``--whiten_rewards`` (GAE only) and whether the KL enters the reward (``False`` with ``--use_kl_loss``:
    the policy loss carries it instead)."""

    name: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    kl_in_reward: bool = True

    @property
    def needs_critic(self) -> bool:
        return self.name in NEEDS_CRITIC

    @property
    def needs_groups(self) -> bool:
        return self.name in NEEDS_GROUPS


@dataclass
class Advantages:
    """Result of steps 4–5: advantages [N, R] (zero outside the mask) and, for GAE, the critic's value
    targets ``returns`` [N, R] (``None`` for the critic-free estimators)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


def estimate_advantages(
    settings: EstimatorSettings,
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group_ids: torch.Tensor,
    values: torch.Tensor | None,
    reduce_sum: ReduceSum,
) -> Advantages:
    """Steps 4–5 of the loop for the estimator ``settings.name`` (see the module docstring).

    scores: [N] clipped scores r_i; kl: [N, R] per-token KL_t (zero outside the mask); mask: [N, R];
    beta: the KL coefficient β; group_ids: [N]; values: [N, R] critic values (``gae`` only, else ``None``);
    reduce_sum: the backend's sum over processes (whitening is over all processes' tokens).

    - ``gae``: token rewards r_t = −β·KL_t + r_i·[t = last] (optionally whitened, mean kept), GAE with
      ``gamma``/``lam``, advantages whitened; returns = advantages + values before whitening.
    - ``dr_grpo``/``rloo``: the sequence score r_i − β·Σ_t KL_t (or r_i alone with the KL in the loss)
      goes through :func:`sequence_advantages`; ``grpo``: r_i does, and −β·Σ_t KL_t is added after, so
      the group's score spread does not scale the KL term.
    - ``reinforce_pp``/``reinforce_pp_baseline``: token rewards as for GAE from r_i (or r_i − mean_g r),
      returns G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over all processes.
    """
    reward_beta = beta if settings.kl_in_reward else 0.0
    name = settings.name
    if name == "gae":
        if values is None:
            raise ValueError("gae needs the critic's values")
        rewards, _ = kl_shaped_rewards(scores, kl, mask, reward_beta)
        if settings.whiten_rewards:
            rewards = global_masked_whiten(rewards, mask, reduce_sum, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, settings.gamma, settings.lam)
        return Advantages(global_masked_whiten(advantages, mask, reduce_sum), returns)
    if name in SEQUENCE_LEVEL:
        penalty = reward_beta * (kl * mask).sum(1)  # β·Σ_t KL_t per response
        if name == "grpo":  # the group's spread scales the scores only: see the module docstring
            return Advantages(sequence_advantages(name, scores, group_ids, mask) - penalty[:, None] * mask)
        return Advantages(sequence_advantages(name, scores - penalty, group_ids, mask))
    if name in ("reinforce_pp", "reinforce_pp_baseline"):
        if name == "reinforce_pp_baseline":
            scores = group_centred_scores(scores, group_ids)
        rewards, _ = kl_shaped_rewards(scores, kl, mask, reward_beta)
        advantages, _ = reinforce_pp_advantages(rewards, mask, settings.gamma, reduce_sum)
        return Advantages(advantages)
    raise ValueError(f"unknown advantage estimator {name!r} (expected one of {', '.join(ESTIMATORS)})")
