"""Batching SFT examples: padded to the longest example, or packed into one padding-free row.

Padded batches carry an ``attention_mask`` built from each example's length (never from pad ids, which may
equal EOS). Packed batches (``--packing``) concatenate the examples of a batch into a single row whose
``position_ids`` restart at 0 for every example; transformers turns those into a block-diagonal causal mask
(SDPA/eager) or variable-length FlashAttention, so packed examples never attend to each other, and no
compute is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from rlhf.sft.examples import IGNORE_INDEX
from rlhf.training.packed_attention import is_packed_attention


@dataclass
class PaddedCollator:
    """Right-pad ``input_ids``/``labels`` to the longest example (rounded up to ``pad_to_multiple_of``)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, (feature, n) in enumerate(zip(features, lengths)):
            input_ids[i, :n] = torch.as_tensor(feature["input_ids"])
            labels[i, :n] = torch.as_tensor(feature["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_collator(attn_implementation: str | None) -> DataCollatorWithFlattening:
    """The padding-free collator: one row per batch, ``position_ids`` restarting per example.

    FlashAttention and :mod:`rlhf.training.packed_attention` also get the cumulative sequence lengths
    (``cu_seq_lens_q``, ``max_length_q``) they need for variable-length attention.
    """
    flash = bool(attn_implementation) and (
        "flash" in attn_implementation or is_packed_attention(attn_implementation)
    )
    return DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash)
