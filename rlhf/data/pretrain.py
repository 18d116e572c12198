"""Pretraining text: tokenize ``*.txt`` files and cut the token stream into ``block_size`` chunks."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.compute as pc
import torch

from rlhf.data.code_version import map_fingerprint
from rlhf.data.loading import load_text_dir
from rlhf.data.templates import without_appended_eos
from rlhf.errors import DataError

logger = logging.getLogger(__name__)

TOKENIZE_ROWS = 8  # text rows (rlhf.data.loading.TEXT_ROW_CHARS each) tokenized per call


def load_pretrain_blocks(
    dataset_dir: str, tokenizer: Any, block_size: int, cache_dir: str | None = None
) -> torch.Tensor:
    """The ``*.txt`` files of ``dataset_dir`` as one token stream cut into blocks: [N, block_size] int32 (as
    ``datasets`` caches ``input_ids``: half the memory of int64; a batch is cast to int64 on its way to the
    model).

    Each line is a document: it gets the tokenizer's BOS (if it adds one) and an EOS at its end. The
    documents are concatenated in file order and cut into full blocks; the remainder is dropped. The text
    is tokenized a few rows at a time into ``datasets``' cache (memory-mapped), and the stream is read back
    as one array: memory stays near the size of the tokens, whatever the size of the text.
    """
    texts = load_text_dir(dataset_dir, cache_dir)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        rows = []
        for text in batch["text"]:
            docs = [line for line in text.splitlines() if line.strip()]
            ids = tokenizer(docs)["input_ids"] if docs else []
            if tokenizer.eos_token_id is not None:
                ids = [
                    without_appended_eos(seq, doc, tokenizer) + [tokenizer.eos_token_id]
                    for seq, doc in zip(ids, docs)
                ]
            rows.append([token for seq in ids for token in seq])
        return {"input_ids": rows}

    tokens = texts.map(
        tokenize,
        batched=True,
        batch_size=TOKENIZE_ROWS,
        remove_columns=["text"],
        desc="tokenizing pretraining text",
        new_fingerprint=map_fingerprint(texts, "pretrain_tokens", tokenizer=tokenizer),
    )
    stream = pc.list_flatten(tokens.data.column("input_ids")).to_numpy()  # rows in order: a fresh map
    usable = len(stream) - len(stream) % block_size
    if usable == 0:
        raise DataError(f"{dataset_dir}: fewer than block_size={block_size} tokens of text")
    logger.info(
        "pretraining text: %d tokens -> %d blocks of --block_size %d (the last %d tokens dropped)",
        len(stream), usable // block_size, block_size, len(stream) - usable,
    )  # fmt: skip
    # a copy: the Arrow buffer is read-only (torch warns about tensors over it)
    return torch.from_numpy(stream[:usable].astype("int32", copy=True).reshape(-1, block_size))
