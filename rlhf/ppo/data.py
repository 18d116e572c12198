"""PPO data: tokenized prompts and pretraining blocks, drawn in a resumable, sharded, shuffled order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.data import load_dataset_dir, load_pretrain_blocks, render_prompt, split_rows
from rlhf.data.sequences import fit_to_length
from rlhf.data.templates import encode_rendered_prompt
from rlhf.errors import DataError
from rlhf.ppo.config import check_eval_split

logger = logging.getLogger(__name__)


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
    what: str = ""  # names the data and flags in the error when there is not one batch

    def __post_init__(self) -> None:
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.what or 'data'}: {self.size} item(s), fewer than one batch of {self.batch_size} per "
                f"process x {self.world} process(es)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def next(self) -> list[int]:
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


PROGRESS_FROM_ROWS = 10_000  # a progress bar while tokenizing this many prompts or more (~3 s per 10k)


@dataclass
class PromptSet:
    """Prompt token ids (BOS once, cut to ``--max_prompt_length``) and their rendered text (uncut: what a
    ``--reward_fn`` receives)."""

    ids: list[list[int]]
    texts: list[str]
    source: str = "--dataset_dir"  # the flag and path they came from, for errors
    # rendered text -> its conversation, for the chat rows: a reward model with its own tokenizer renders
    # them with its own chat template, as its stage trained it
    chats: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def cut_prompts(
    ids: list[list[int]], max_prompt_length: int, bos_id: int | None, where: str
) -> list[list[int]]:
    """Prompts longer than ``max_prompt_length`` tokens keep their end (next to the response) and their
    leading BOS, as SFT and the reward model cut theirs (:func:`rlhf.data.sequences.fit_to_length`); the
    count of cut prompts is logged, naming ``where`` (the data) and the flag."""
    cut = [p for p in ids if len(p) > max_prompt_length]
    if not cut:
        return ids
    logger.warning(
        "%s: %d of %d prompts were longer than --max_prompt_length %d and keep their last tokens%s",
        where, len(cut), len(ids), max_prompt_length, " (after the BOS)" if bos_id is not None else "",
    )  # fmt: skip
    if max_prompt_length < 2:
        return [p[-max_prompt_length:] for p in ids]
    return [fit_to_length(p, [], max_prompt_length, bos_id=bos_id)[0] for p in ids]


def load_prompts(
    dataset_dir: str,
    tokenizer: Any,
    max_prompt_length: int,
    cache_dir: str | None,
    show_progress: bool = True,
) -> PromptSet:
    """Prompts of any SFT or ``{"prompt"}`` record in ``dataset_dir`` (an error names ``--dataset_dir``);
    a progress bar from :data:`PROGRESS_FROM_ROWS` rows when ``show_progress`` (the main process, no
    ``--disable_tqdm``)."""
    try:
        rows = load_dataset_dir(dataset_dir, "prompt", cache_dir)
    except DataError as exc:
        raise DataError(f"--dataset_dir: {exc}") from exc
    ids, texts, chats = [], [], {}
    for row in tqdm(
        rows, desc="tokenizing prompts", disable=not show_progress or len(rows) < PROGRESS_FROM_ROWS
    ):
        texts.append(render_prompt(row, tokenizer))  # rendered once (a chat template is slow)
        ids.append(encode_rendered_prompt(texts[-1], tokenizer))
        if row.get("prompt_messages"):
            chats[texts[-1]] = row["prompt_messages"]
    if not ids:
        raise DataError(f"--dataset_dir {dataset_dir}: no prompts")
    ids = cut_prompts(ids, max_prompt_length, tokenizer.bos_token_id, dataset_dir)
    return PromptSet(ids, texts, f"--dataset_dir {dataset_dir}", chats)


def hold_out_prompts(prompts: PromptSet, split_ratio: float, seed: int) -> tuple[PromptSet, PromptSet]:
    """(training, held-out) prompts for ``--do_eval``: a ``--split_ratio`` share of the *distinct* prompt
    texts, seeded by ``--seed`` (at least one, at most all but one). Every row whose text is held out leaves
    the training share, so a prompt the data repeats is never both trained on and evaluated; each held-out
    text is evaluated once."""
    check_eval_split(split_ratio)
    first_row = {}  # text -> its first row
    for row, text in enumerate(prompts.texts):
        first_row.setdefault(text, row)
    if len(first_row) < 2:
        raise DataError(
            f"{prompts.source}: --do_eval needs at least 2 distinct prompts (one to train on), found {len(first_row)}"
        )
    _, held = split_rows(list(first_row), split_ratio, seed)
    held_texts = set(held)
    train = [row for row, text in enumerate(prompts.texts) if text not in held_texts]
    logger.info(
        "--do_eval: %d distinct prompts held out for evaluation (--split_ratio %g), %d prompts (rows) to train on",
        len(held), split_ratio, len(train),
    )  # fmt: skip
    return (
        PromptSet(
            [prompts.ids[i] for i in train],
            [prompts.texts[i] for i in train],
            f"{prompts.source} (training share)",
            prompts.chats,
        ),
        PromptSet(
            [prompts.ids[first_row[t]] for t in held],
            held,
            f"{prompts.source} (held out by --split_ratio)",
            prompts.chats,
        ),
    )


def load_pretrain(dataset_dir: str, tokenizer: Any, block_size: int, cache_dir: str | None) -> torch.Tensor:
    """Pretraining blocks as one [N, block_size] tensor (an error names ``--pretrain_dataset_dir``: a PPO
    run reads several paths)."""
    try:
        return load_pretrain_blocks(dataset_dir, tokenizer, block_size, cache_dir)
    except DataError as exc:
        raise DataError(f"--pretrain_dataset_dir: {exc}") from exc
