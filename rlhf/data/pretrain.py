"""Pretraining text: tokenize ``*.txt`` files and cut the token stream into ``block_size`` chunks."""

from __future__ import annotations

from typing import Any

import datasets

from rlhf.data.code_version import map_fingerprint
from rlhf.data.loading import load_text_dir
from rlhf.data.templates import without_appended_eos
from rlhf.errors import DataError


def group_into_blocks(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut them into full blocks of ``block_size``; the remainder is dropped.

    >>> group_into_blocks([[1, 2, 3], [4, 5]], 2)
    [[1, 2], [3, 4]]
    """
    flat = [token for tokens in token_lists for token in tokens]
    usable = len(flat) - len(flat) % block_size
    return [flat[i : i + block_size] for i in range(0, usable, block_size)]


def load_pretrain_blocks(
    dataset_dir: str, tokenizer: Any, block_size: int, cache_dir: str | None = None
) -> datasets.Dataset:
    """``{"input_ids": [block_size ints]}`` rows from the ``*.txt`` files of ``dataset_dir``.

    Each line is a document: it gets the tokenizer's BOS (if it adds one) and an EOS at its end.
    """
    texts = load_text_dir(dataset_dir, cache_dir)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        docs = [line for text in batch["text"] for line in text.splitlines() if line.strip()]
        ids = tokenizer(docs)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [
                without_appended_eos(seq, doc, tokenizer) + [tokenizer.eos_token_id]
                for seq, doc in zip(ids, docs)
            ]
        return {"input_ids": group_into_blocks(ids, block_size)}

    blocks = texts.map(
        tokenize,
        batched=True,
        remove_columns=["text"],
        desc="grouping pretraining text",
        new_fingerprint=map_fingerprint(texts, "pretrain_blocks", tokenizer=tokenizer, block_size=block_size),
    )
    if len(blocks) == 0:
        raise DataError(f"{dataset_dir}: fewer than block_size={block_size} tokens of text")
    return blocks
