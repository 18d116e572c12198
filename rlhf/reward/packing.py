"""Packed reward-model batches (``--packing``): the 2B sides of B pairs in one padding-free row.

The chosen sides come first, then the rejected ones, as in :class:`rlhf.reward.pairs.PairCollator`, so
chosen and rejected of a pair still go through one forward. ``position_ids`` restart at 0 for every side
and ``cu_seq_lens_q`` holds the side boundaries, which :mod:`rlhf.training.packed_attention` uses to keep
the sides from attending to each other; the reward of a side is the score head at its last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.reward.model import token_scores

PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class PackedPairCollator:
    """B pairs -> ``input_ids``/``position_ids`` (1, N), boundaries ``cu_seq_lens_q/k`` (2B + 1,) int32,
    ``max_length_q/k`` (int) and ``margin`` (B,); N is the total length of the 2B sides."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        lengths = torch.tensor([len(s) for s in sequences])
        cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        longest = int(lengths.max())
        return {
            "input_ids": torch.tensor([tok for seq in sequences for tok in seq])[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "margin": torch.tensor([float(f["margin"]) for f in features]),
        }


def packed_sequence_rewards(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(2B,) reward of every side of a :class:`PackedPairCollator` batch: the score head at each side's end."""
    scores = token_scores(
        model,
        input_ids=inputs["input_ids"],
        position_ids=inputs["position_ids"],
        **{key: inputs[key] for key in PACKED_KEYS},
    )  # (1, N)
    ends = inputs["cu_seq_lens_q"][1:].long() - 1
    return scores[0, ends].float()
