"""Training sequences of the TP supervised stages: one example and right-padded micro-batches.

A solver example carries per-token ``labels`` (-100 = no loss, e.g. on the prompt); a verifier example a
sequence ``target`` (1.0 correct, 0.0 incorrect) read at its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One training sequence: token ids, and per-token ``labels`` (-100 = no loss) or a sequence ``target``;
    ``cut`` when the length limit took its end."""

    input_ids: list[int]
    labels: list[int] | None = None
    target: float | None = None
    cut: bool = False


def collate(examples: list[Example], pad_id: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [B, T], ``labels`` [B, T] (-100 on padding) and/or
    ``targets`` [B]; ``last`` [B] is the column of each sequence's last real token."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if e.labels is not None:
            labels[row, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "last": mask.sum(1) - 1}
    if examples[0].target is not None:
        batch["targets"] = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return {k: v.to(dev) for k, v in batch.items()}


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """``examples`` in order, in chunks of ``size`` (the last one may be shorter)."""
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    """``examples`` in a seeded random order (the same on every rank for the same seed)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return [examples[i] for i in order.tolist()]
