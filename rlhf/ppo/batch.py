"""Token batches the PPO loop passes around: a prompt+response batch and the rollout buffer.

Layout of one sequence (``P`` prompt columns, ``R`` response columns, ``T = P + R``)::

    [pad pad p1 p2 p3 | r1 r2 r3 EOS pad pad]
     left-padded prompt | right-padded response

``attention_mask`` is 1 on real tokens. Positions are counted from the first real token, so a sequence
gets the same position ids whatever its padding, and a forward over a few rows can drop the columns that are
padding in all of them (:meth:`SequenceBatch.fitted`): the rollout's forwards and the update's
mini-batches run over the widths their own rows need, not over the longest response of the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


WIDTH_MULTIPLE = 16  # fitted widths are rounded up to it: few distinct shapes for kernels and torch.compile


def fitted_width(longest: int, limit: int, multiple: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (default :data:`WIDTH_MULTIPLE`), at least 1 and
    at most ``limit``."""
    multiple = multiple or WIDTH_MULTIPLE
    return min(limit, max(1, -(-longest // multiple) * multiple))


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

    def fitted(self, longest_prompt: int, longest_response: int) -> SequenceBatch:
        """This batch without the prompt columns left of, and the response columns right of, the
        :func:`fitted_width` of its longest prompt and response (host-side numbers: no device sync). Only
        padding goes when those are its rows' longest: the same sequences and positions, and outputs over
        the response columns equal the first columns of the full batch's."""
        prompt = fitted_width(longest_prompt, self.prompt_len)
        response = fitted_width(longest_response, self.input_ids.shape[1] - self.prompt_len)
        columns = slice(self.prompt_len - prompt, self.prompt_len + response)
        return SequenceBatch(self.input_ids[:, columns], self.attention_mask[:, columns], prompt)

    def lengths(self) -> tuple[list[int], list[int]]:
        """(prompt lengths, response lengths) of every row, on the host (one device sync)."""
        prompt = self.attention_mask[:, : self.prompt_len].sum(1)
        return tuple(torch.stack([prompt, self.attention_mask[:, self.prompt_len :].sum(1)]).tolist())

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
    # the order and each row's prompt and response lengths on the host, read once (mini_batch)
    _host: tuple[list[int], list[int], list[int]] | None = field(default=None, repr=False, compare=False)

    PER_ROW = ("old_logprobs", "old_values", "advantages", "returns", "ref_logprobs", "scores")

    @property
    def num_mini_batches(self) -> int:
        return self.order.numel() // self.mini_batch_size

    @property
    def exhausted(self) -> bool:
        return self.cursor >= self.num_mini_batches

    def mini_batch(self, index: int) -> tuple[SequenceBatch, dict[str, torch.Tensor]]:
        """The ``index``-th mini-batch over all epochs: (sequences, {old_logprobs, advantages, ...}) with
        the per-row tensors this buffer holds, fitted to the mini-batch's own longest prompt and response
        (:meth:`SequenceBatch.fitted`; the per-token tensors cut to its response columns)."""
        if self._host is None:  # one device sync per rollout
            self._host = (self.order.reshape(-1).tolist(), *self.sequences.lengths())
        order, prompt_lengths, response_lengths = self._host
        span = slice(index * self.mini_batch_size, (index + 1) * self.mini_batch_size)
        rows, host_rows = self.order.reshape(-1)[span], order[span]
        batch = self.sequences.select(rows).fitted(
            max(prompt_lengths[r] for r in host_rows), max(response_lengths[r] for r in host_rows)
        )
        width = batch.input_ids.shape[1] - batch.prompt_len
        tensors = {k: getattr(self, k)[rows] for k in self.PER_ROW if getattr(self, k) is not None}
        return batch, {k: v[:, :width] if v.dim() == 2 else v for k, v in tensors.items()}

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
