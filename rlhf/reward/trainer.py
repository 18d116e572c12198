"""``RewardTrainer``: ``transformers.Trainer`` with the pairwise loss and its evaluation metrics.

Evaluation reports ``eval_loss`` (the training loss on all held-out pairs), ``eval_accuracy`` (share of
pairs ranked right), ``eval_margin`` (mean r_c - r_r) and the mean chosen/rejected rewards; they go to the
logs and ``trainer_state.json``. All come from the per-pair rewards that Trainer gathers and deduplicates,
so they are the same on any number of processes and for any eval batch size: Trainer's own ``eval_loss``
(one mean per batch, repeated per row) counted the rows that pad the last batch of each process.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer

from rlhf.reward.losses import pairwise_loss
from rlhf.reward.model import sequence_rewards
from rlhf.reward.packing import packed_sequence_rewards
from rlhf.training import AtomicCheckpointMixin, FiniteLossMixin


class RewardTrainer(FiniteLossMixin, AtomicCheckpointMixin, Trainer):
    """Trains a scalar reward model on batches from :class:`rlhf.reward.pairs.PairCollator` (or
    :class:`rlhf.reward.packing.PackedPairCollator`)."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean; Trainer divides by the accumulation steps

    def __init__(self, *args, center_rewards_coefficient: float = 0.0, **kwargs):
        kwargs.setdefault(
            "compute_metrics", partial(reward_metrics, center_coefficient=center_rewards_coefficient)
        )
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient

    def pair_rewards(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, each (B,), from a padded or a packed (``--packing``) batch."""
        if "cu_seq_lens_q" in inputs:
            return packed_sequence_rewards(model, inputs).chunk(2)
        rewards = sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        return rewards.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self.pair_rewards(model, inputs)
        loss = pairwise_loss(chosen, rejected, inputs.get("margin"), self.center_rewards_coefficient)
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(B, 3) [chosen, rejected, margin] as predictions, even when only the loss is asked for, and no
        loss: :func:`reward_metrics` computes it from the gathered pairs, and Trainer reports it as
        ``eval_loss``."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            chosen, rejected = self.pair_rewards(model, inputs)
        margin = inputs.get("margin")
        margin = torch.zeros_like(chosen) if margin is None else margin.to(chosen)
        pairs = torch.stack([chosen, rejected, margin], dim=1).detach()
        return None, pairs, torch.zeros(len(chosen), device=pairs.device)


def reward_metrics(prediction: EvalPrediction, center_coefficient: float = 0.0) -> dict[str, Any]:
    """Loss, accuracy and mean margin from the (N, 3) [chosen, rejected, margin] rows of an evaluation.

    ``loss`` is :func:`pairwise_loss` (with ``center_coefficient``) on all N pairs at once; Trainer reports
    it as ``eval_loss``.
    """
    rows = prediction.predictions  # a list of per-batch arrays under --eval_do_concat_batches False
    rewards = np.concatenate(rows) if isinstance(rows, (list, tuple)) else rows
    rewards = np.asarray(rewards, dtype=np.float64)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    loss = pairwise_loss(*torch.from_numpy(rewards).unbind(1), center_coefficient)
    return {
        "loss": loss.item(),
        "accuracy": float((chosen > rejected).mean()),
        "margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
    }
