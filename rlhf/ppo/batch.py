"""Token batches the PPO loop passes around: a prompt+response batch and the rollout buffer.

Layout of one sequence (``P`` prompt columns, ``R`` response columns, ``T = P + R``)::

    [pad pad p1 p2 p3 | r1 r2 r3 EOS pad pad]
     left-padded prompt | right-padded response

``attention_mask`` is 1 on real tokens. Positions are counted from the first real token, so a sequence
gets the same position ids whatever its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, L], mask [B, L]) padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def pad_columns(x: torch.Tensor, width: int, value: int | float, left: bool) -> torch.Tensor:
    """Pad a [B, L] tensor to [B, width] on the left or the right."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


@dataclass
class SequenceBatch:
    """Prompt + response tokens. input_ids, attention_mask: [B, T]; the first ``prompt_len`` columns are
    the (left-padded) prompt."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, R]"""
        return self.input_ids[:, self.prompt_len :]

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, R] float, 1 on response tokens up to and including the first EOS."""
        return self.attention_mask[:, self.prompt_len :].float()

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, T]: 0 at the first real token, whatever the left padding."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def last_token_positions(self) -> torch.Tensor:
        """[B]: column of the last real token (where a reward model reads its score)."""
        width = self.attention_mask.shape[1]
        return width - 1 - self.attention_mask.long().flip(-1).argmax(-1)

    def select(self, rows: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.prompt_len)

    @staticmethod
    def concat(batches: list[SequenceBatch], pad_id: int) -> SequenceBatch:
        """Stack batches with different prompt and response widths (re-padding both sides with ``pad_id``)."""
        prompt_len = max(b.prompt_len for b in batches)
        response_len = max(b.input_ids.shape[1] - b.prompt_len for b in batches)
        ids, masks = [], []
        for b in batches:
            for tensor, out, value in ((b.input_ids, ids, pad_id), (b.attention_mask, masks, 0)):
                prompt = pad_columns(tensor[:, : b.prompt_len], prompt_len, value, left=True)
                response = pad_columns(tensor[:, b.prompt_len :], response_len, value, left=False)
                out.append(torch.cat([prompt, response], dim=1))
        return SequenceBatch(torch.cat(ids), torch.cat(masks), prompt_len)


@dataclass
class RolloutBuffer:
    """One rollout after steps 1–5, consumed by the PPO epochs of step 6.

    ``order`` [ppo_epochs, N] holds each epoch's shuffled sample order; ``cursor`` counts the mini-batches
    already trained on, so a checkpoint taken in the middle of a rollout resumes at the same mini-batch.
    ``group_ids`` [N] labels the responses sampled for one prompt (``--num_samples_per_prompt``): a group
    lives on one process, and its label is unique over processes and rollouts. ``old_values`` and
    ``returns`` exist with a critic (``gae``), ``ref_logprobs`` with ``--use_kl_loss``; with
    ``--old_logprobs update`` ``old_logprobs`` is ``None`` and ``ref_logprobs`` and ``scores`` are kept for the
    update's KL statistics.
    """

    sequences: SequenceBatch  # [N, T]
    old_logprobs: torch.Tensor | None  # [N, R]; None with --old_logprobs update (the update's own)
    advantages: torch.Tensor  # [N, R]
    order: torch.Tensor  # [ppo_epochs, N]
    mini_batch_size: int
    group_ids: torch.Tensor  # [N] long
    old_values: torch.Tensor | None = None  # [N, R]
    returns: torch.Tensor | None = None  # [N, R]
    ref_logprobs: torch.Tensor | None = None  # [N, R]
    scores: torch.Tensor | None = None  # [N], with --old_logprobs update (its KL statistics)
    cursor: int = 0

    PER_ROW = ("old_logprobs", "old_values", "advantages", "returns", "ref_logprobs", "scores")

    @property
    def num_mini_batches(self) -> int:
        return self.order.numel() // self.mini_batch_size

    @property
    def exhausted(self) -> bool:
        return self.cursor >= self.num_mini_batches

    def mini_batch(self, index: int) -> tuple[SequenceBatch, dict[str, torch.Tensor]]:
        """The ``index``-th mini-batch over all epochs: (sequences, {old_logprobs, advantages, ...}) with
        the per-token tensors this buffer holds."""
        flat = self.order.reshape(-1)
        rows = flat[index * self.mini_batch_size : (index + 1) * self.mini_batch_size]
        tensors = {k: getattr(self, k)[rows] for k in self.PER_ROW if getattr(self, k) is not None}
        return self.sequences.select(rows), tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything as named tensors (for a checkpoint); absent optional tensors are left out."""
        optional = {k: getattr(self, k) for k in self.PER_ROW if getattr(self, k) is not None}
        return {
            "input_ids": self.sequences.input_ids,
            "attention_mask": self.sequences.attention_mask,
            "prompt_len": torch.tensor(self.sequences.prompt_len),
            **optional,
            "group_ids": self.group_ids,
            "order": self.order,
            "mini_batch_size": torch.tensor(self.mini_batch_size),
            "cursor": torch.tensor(self.cursor),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> RolloutBuffer:
        seqs = SequenceBatch(t["input_ids"], t["attention_mask"], int(t["prompt_len"]))
        n = seqs.input_ids.shape[0]
        # checkpoints written before groups existed: every response its own group
        group_ids = t.get("group_ids", torch.arange(n, device=seqs.input_ids.device))
        return cls(
            seqs,
            t.get("old_logprobs"),
            t["advantages"],
            t["order"],
            int(t["mini_batch_size"]),
            group_ids,
            old_values=t.get("old_values"),
            returns=t.get("returns"),
            ref_logprobs=t.get("ref_logprobs"),
            scores=t.get("scores"),
            cursor=int(t["cursor"]),
        )
