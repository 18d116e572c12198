"""SFT examples: a normalized row becomes ``input_ids`` and ``labels`` with the prompt masked out.

``input_ids = BOS + prompt + response + EOS`` and ``labels`` holds -100 on every prompt token, so the loss
covers the response and its EOS only: the model learns to stop. The EOS is appended by id, never found
through the pad id, so it is learned also when the tokenizer pads with its EOS token. Over-long examples
are cut by :func:`rlhf.data.sequences.fit_to_length` (prompt from the left, response on the right) and
counted. An example longer than the model's ``max_position_embeddings`` (a ``--block_size`` above it) is
one warning line: the RoPE models the stages train run there, but on positions they never saw in training.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import pyarrow.compute as pc

from rlhf.data import tokenize_prompt
from rlhf.data.code_version import map_fingerprint
from rlhf.data.sequences import encode_response, fit_to_length, warn_beyond_context
from rlhf.errors import DataError
from rlhf.models.loading import model_context_length

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def tokenize_sft_row(row: dict[str, Any], tokenizer: Any, block_size: int) -> dict[str, Any]:
    """``{"input_ids", "labels", "truncated"}`` for one normalized SFT row (see module docstring)."""
    prompt = tokenize_prompt(row, tokenizer)
    response = encode_response(row["response"], tokenizer)
    special = not set(tokenizer.all_special_ids).isdisjoint(response[:-1])
    prompt, response, truncated = fit_to_length(prompt, response, block_size, bos_id=tokenizer.bos_token_id)
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
        "truncated": truncated,
        "special_in_response": special,
    }


def warn_special_tokens_in_responses(rows: datasets.Dataset, found: list[int]) -> None:
    """One warning naming the first row (of the indices ``found``) whose response text spells a special token
    (``</s>``, ``<s>``, ``<|endoftext|>``): Hugging Face tokenizers read such text as that token, as TRL and
    LLaMA-Factory train it, so an EOS spelt inside an answer teaches the model to stop there."""
    if found:
        first = rows[found[0]].get("where") or f"row {found[0]}"
        logger.warning("%d of %d SFT responses spell a special token of the tokenizer as text (the first: %s): "
                       "it is read as that token, so the model learns to write it there (an EOS ends the "
                       "answer); remove it from the data if it is meant as text", len(found), len(rows), first)  # fmt: skip


def drop_empty_responses(rows: datasets.Dataset) -> datasets.Dataset:
    """Drop rows whose response is empty or whitespace (nothing to learn but an EOS: a data error far more
    often than an intent), with a count in the log naming the first one; none left is an error."""
    responses = rows.with_format("arrow")["response"]  # Arrow compute: no Python string per row
    empty = pc.indices_nonzero(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(responses)), 0)).to_pylist()
    if not empty:
        return rows
    first = rows[empty[0]].get("where") or f"row {empty[0]}"
    if len(empty) == len(rows):
        raise DataError(f"every SFT example has an empty response (the first: {first})")
    logger.warning(
        "dropped %d of %d SFT examples with an empty response (the first: %s)", len(empty), len(rows), first
    )
    dropped = set(empty)
    return rows.select([i for i in range(len(rows)) if i not in dropped])


def tokenize_sft_dataset(
    rows: datasets.Dataset,
    tokenizer: Any,
    block_size: int,
    num_proc: int | None = None,
    context_length: int | None = None,
) -> datasets.Dataset:
    """Tokenize every row; log how many were cut to ``block_size``, and warn when an example is longer than
    ``context_length`` (the model's ``max_position_embeddings``; by default read from the ``config.json`` of
    the dir the tokenizer was loaded from, see :func:`rlhf.models.loading.model_context_length`). Returns ``{"input_ids",
    "labels"}``."""
    if block_size < 2:
        raise DataError(f"--block_size must be at least 2, got {block_size}")
    rows = drop_empty_responses(rows)
    settings = {"tokenizer": tokenizer, "block_size": block_size}
    examples = rows.map(
        tokenize_sft_row,
        fn_kwargs=settings,
        remove_columns=rows.column_names,
        num_proc=num_proc,
        desc="tokenizing SFT examples",
        new_fingerprint=map_fingerprint(rows, "tokenize_sft_row", **settings),
    )
    table = examples.with_format("arrow")  # the checks in Arrow compute: no Python object per row
    warn_special_tokens_in_responses(rows, pc.indices_nonzero(table["special_in_response"]).to_pylist())
    n_truncated = pc.sum(table["truncated"]).as_py() or 0
    if n_truncated:
        logger.warning("%d of %d examples were longer than --block_size %d and were cut",
                       n_truncated, len(examples), block_size)  # fmt: skip
    lengths = pc.list_value_length(table["input_ids"])
    if context_length is None:
        context_length = model_context_length(getattr(tokenizer, "name_or_path", None))
    warn_beyond_context(pc.max(lengths).as_py(), context_length, "--block_size", block_size)
    n_tokens = pc.sum(lengths).as_py()
    logger.info(
        "%d SFT examples, %d tokens (%.1f per example)", len(examples), n_tokens, n_tokens / len(examples)
    )
    return examples.remove_columns(["truncated", "special_in_response"])
