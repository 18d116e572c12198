"""Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

δ_t = r_t + γ·V(s_{t+1}) - V(s_t),  Â_t = Σ_l (γλ)^l · δ_{t+l},  returns R_t = Â_t + V(s_t).

V(s_t) is the critic's value of the state before response token t; past the last response token the
value is 0 (the episode has ended), which is why values and rewards are zeroed outside the mask.
"""

from __future__ import annotations

import torch


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by the backward GAE recursion.

    rewards, values, mask: [B, R] (right-padded responses). Returns (advantages [B, R], returns [B, R]),
    zero outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns
