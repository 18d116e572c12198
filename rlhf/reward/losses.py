"""The pairwise reward-model loss and its evaluation statistics (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Bradley-Terry loss of a batch of preference pairs (a scalar).

    ``loss = mean(-log sigmoid(r_c - r_r - m)) + c * mean((r_c + r_r)^2)``

    - ``chosen``, ``rejected``: (B,) rewards of the preferred and the other response;
    - ``margin``: optional (B,) required gap ``m`` (Llama 2, eq. 2); 0 when absent;
    - ``center_coefficient``: ``c``, pulls the rewards towards zero mean (Eisenstein et al., 2023), which
      keeps their scale stable for PPO.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher. Shapes (B,)."""
    return (chosen > rejected).float().mean().item()
