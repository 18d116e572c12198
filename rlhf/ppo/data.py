"""PPO data: tokenized prompts and pretraining blocks, drawn in a resumable, sharded, shuffled order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.data import load_dataset_dir, load_pretrain_blocks, render_prompt, tokenize_prompt
from rlhf.errors import DataError


@dataclass
class EpochSampler:
    """Batches of indices into ``size`` items: each epoch is a fresh permutation seeded by (seed, epoch);
    a global batch holds ``batch_size × world`` indices and process ``rank`` takes every world-th one.
    The position (``epoch``, ``position``) is all a checkpoint needs to continue the same order.
    """

    size: int
    batch_size: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    epoch: int = 0
    position: int = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def next(self) -> list[int]:
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.size} items are fewer than one batch of {self.batch_size} x {self.world}")
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        width = self.batch_size * self.world
        chunk = order[self.position * width : (self.position + 1) * width]
        self.position += 1
        return chunk[self.rank :: self.world].tolist()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class PromptSet:
    """Prompt token ids (BOS once, the last ``max_prompt_length`` kept) and their rendered text."""

    ids: list[list[int]]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(
    dataset_dir: str, tokenizer: Any, max_prompt_length: int, cache_dir: str | None
) -> PromptSet:
    """Prompts of any SFT or ``{"prompt"}`` record in ``dataset_dir``."""
    rows = load_dataset_dir(dataset_dir, "prompt", cache_dir)
    ids, texts = [], []
    for row in rows:
        ids.append(tokenize_prompt(row, tokenizer)[-max_prompt_length:])
        texts.append(render_prompt(row, tokenizer))
    if not ids:
        raise DataError(f"{dataset_dir}: no prompts")
    return PromptSet(ids, texts)


def load_pretrain(dataset_dir: str, tokenizer: Any, block_size: int, cache_dir: str | None) -> torch.Tensor:
    """Pretraining blocks as one [N, block_size] tensor."""
    blocks = load_pretrain_blocks(dataset_dir, tokenizer, block_size, cache_dir)
    return torch.tensor(blocks["input_ids"], dtype=torch.long)
