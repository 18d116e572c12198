"""Preference pairs for the reward model: cleaning, tokenization with truncation, and batching.

- Rows whose chosen and rejected responses are equal, or where either is empty, carry no preference
  signal; they are dropped and counted, the log naming the first one's ``file:line``.
- Each side is ``BOS + prompt + response + EOS``. An over-long side is cut by
  :func:`rlhf.data.sequences.fit_to_length`: a response longer than ``max_response`` (``--block_size``)
  is cut on the right, then the prompt is cut from the left so the side fits ``--max_length``. A pair
  whose two sides are the same tokens after the cut (the responses differ only past the cut) is dropped
  and counted too: its loss is ``ln 2`` whatever the model does, so it only dilutes the batch.
- A batch of B pairs becomes 2B rows (the B chosen first, then the B rejected), padded on the tokenizer's
  padding side, with the attention mask built from the lengths (never from pad ids).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from rlhf.data import tokenize_prompt
from rlhf.data.code_version import map_fingerprint
from rlhf.data.sequences import encode_response, fit_to_length
from rlhf.errors import DataError

logger = logging.getLogger(__name__)


def _where(rows: datasets.Dataset, index: int) -> str:
    """The ``file:line`` of row ``index`` (rows built in memory have none: ``row N``)."""
    return rows[index].get("where") or f"row {index}"


def clean_pairs(rows: datasets.Dataset) -> datasets.Dataset:
    """Drop pairs with chosen == rejected or an empty response; log the counts and the first dropped row."""
    n = len(rows)
    table = rows.with_format("arrow")  # Arrow compute: no Python string per row
    chosen, rejected = (pc.utf8_trim_whitespace(table[side]) for side in ("chosen", "rejected"))
    equal = pc.equal(chosen, rejected)
    blank = pc.or_(pc.equal(pc.utf8_length(chosen), 0), pc.equal(pc.utf8_length(rejected), 0))
    same = pc.indices_nonzero(equal).to_pylist()
    empty = pc.indices_nonzero(pc.and_(blank, pc.invert(equal))).to_pylist()
    if not same and not empty:
        return rows
    first = _where(rows, min(same + empty))
    if len(same) + len(empty) == n:
        raise DataError(
            "no usable preference pairs (every pair has chosen == rejected or an empty response; "
            f"the first: {first})"
        )
    logger.warning("dropped %d of %d pairs: %d with chosen == rejected, %d with an empty response (the first: %s)",
                   len(same) + len(empty), n, len(same), len(empty), first)  # fmt: skip
    dropped = set(same + empty)
    return rows.select([i for i in range(n) if i not in dropped])


def tokenize_pair_row(
    row: dict[str, Any], tokenizer: Any, max_length: int, max_response: int
) -> dict[str, Any]:
    """``{"chosen_ids", "rejected_ids", "margin", "truncated", "same"}`` for one normalized preference row.

    Both sides keep the same prompt: it is cut (from the left) to the room the longer response leaves, so
    the model compares two answers to one context, not a long answer to a shorter-cut prompt.
    """
    full_prompt = tokenize_prompt(row, tokenizer)
    responses = {side: encode_response(row[side], tokenizer) for side in ("chosen", "rejected")}
    bos = tokenizer.bos_token_id
    longest = max(responses.values(), key=len)
    prompt, _, _ = fit_to_length(full_prompt, longest, max_length, max_response, bos)
    out: dict[str, Any] = {"margin": row["margin"], "truncated": len(prompt) < len(full_prompt)}
    for side, response in responses.items():
        p, r, cut = fit_to_length(prompt, response, max_length, max_response, bos)
        out[f"{side}_ids"] = p + r
        out["truncated"] = out["truncated"] or cut
    out["same"] = out["chosen_ids"] == out["rejected_ids"]  # the cut made the two sides one
    return out


def tokenize_pairs(
    rows: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    max_response: int,
    num_proc: int | None = None,
    split: str = "",
) -> datasets.Dataset:
    """Tokenize every pair; log how many were cut, and drop (and count) the pairs whose sides the cut made
    the same tokens; none left is a DataError. Returns ``{"chosen_ids", "rejected_ids", "margin"}``.
    ``split`` ("held-out ", "training ") names the rows in those lines."""
    settings = {"tokenizer": tokenizer, "max_length": max_length, "max_response": max_response}
    pairs = rows.map(
        tokenize_pair_row,
        fn_kwargs=settings,
        remove_columns=rows.column_names,
        num_proc=num_proc,
        desc="tokenizing preference pairs",
        new_fingerprint=map_fingerprint(rows, "tokenize_pair_row", **settings),
    )
    table = pairs.with_format("arrow")
    n_cut = pc.sum(table["truncated"]).as_py() or 0
    if n_cut:
        logger.warning("%d of %d %spairs were cut to --max_length %d / --block_size %d (prompt from the left, "
                       "response on the right)", n_cut, len(pairs), split, max_length, max_response)  # fmt: skip
    same = pc.indices_nonzero(table["same"]).to_pylist()
    if same:
        first = _where(rows, same[0])
        if len(same) == len(pairs):
            raise DataError(
                f"no usable {split}preference pairs: every pair's chosen and rejected are the same tokens after the "
                f"cut to --max_length {max_length} / --block_size {max_response} (the first: {first}); raise "
                "--block_size so the responses' differences fit"
            )
        logger.warning("dropped %d of %d %spairs whose chosen and rejected are the same tokens after the cut "
                       "to --max_length %d / --block_size %d (the first: %s)",
                       len(same), len(pairs), split, max_length, max_response, first)  # fmt: skip
        dropped = set(same)
        pairs = pairs.select([i for i in range(len(pairs)) if i not in dropped])
    return pairs.remove_columns(["truncated", "same"])


@dataclass
class PairCollator:
    """B pairs -> ``input_ids``/``attention_mask`` (2B, T) with chosen rows first, and ``margin`` (B,)."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            span = slice(0, len(seq)) if self.padding_side == "right" else slice(width - len(seq), width)
            input_ids[i, span] = torch.as_tensor(seq)
            attention_mask[i, span] = 1
        margin = torch.tensor([float(f["margin"]) for f in features])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}
