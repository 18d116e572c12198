"""Hugging Face state dict <-> tensor-parallel shards: pure tensor functions over the key maps.

No files here (:mod:`rlhf.tp.hf_checkpoint` and :mod:`rlhf.tp.shard_dir` read and write them): a split
takes any :class:`TensorLookup` (a state dict in memory, or tensors streamed from safetensors one at a
time) and returns the shards' state dicts; a merge takes the N shard state dicts and yields HF tensors.

Shapes, for a weight split N ways:

- column-parallel ``[out, in]`` -> N pieces ``[out / N, in]`` (dim 0); row-parallel -> ``[out, in / N]``;
- a vocabulary split (``output``, tied ``tok_embeddings``) first pads ``[vocab, dim]`` with zero rows to
  ``[padded_vocab, dim]`` (the next multiple of N) and drops them again on merge;
- replicated tensors (norms, router, row-parallel biases, ``v_head``) are the same on every rank;
- a scalar head (a verifier's or critic's ``v_head``) is ``score`` of the HF ``...ForSequenceClassification``
  (:func:`source_head` tells such a state from a causal LM's);
- a fused HF tensor (the original Qwen's ``c_attn`` ``[3 * dim, dim]``) is cut into its equal parts along
  dim 0 before splitting, and concatenated back after merging.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from rlhf.errors import CheckpointError
from rlhf.tp.key_maps import IGNORED_KEYS, check_divisible, concrete_key_map, is_vocab_split, shard_dim
from rlhf.tp.model import ModelArgs


class TensorLookup(Protocol):
    """Tensors by HF key: what a split reads (``dict``-like; may load each tensor on demand)."""

    def keys(self) -> Iterable[str]: ...

    def get(self, key: str) -> torch.Tensor: ...


class StateDictLookup:
    """A state dict already in memory (e.g. an HF model with a LoRA adapter merged in)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


def split_tensor(
    tensor: torch.Tensor, dim: int | None, n: int, padded_rows: int | None = None
) -> list[torch.Tensor]:
    """The N shards of one tensor: chunks along ``dim``, or N references when replicated (``dim`` None).

    ``padded_rows`` first pads dim 0 with zero rows (a vocabulary N does not divide).
    """
    if padded_rows is not None and padded_rows > tensor.shape[0]:
        pad = tensor.new_zeros(padded_rows - tensor.shape[0], *tensor.shape[1:])
        tensor = torch.cat([tensor, pad], dim=0)
    if dim is None:
        return [tensor] * n
    if tensor.shape[dim] % n:
        raise CheckpointError(
            f"a tensor of shape {tuple(tensor.shape)} cannot be split {n} ways on dim {dim}"
        )
    return [piece.clone() for piece in torch.chunk(tensor, n, dim=dim)]


def merge_tensors(pieces: list[torch.Tensor], dim: int | None, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`split_tensor`: concatenate along ``dim`` (or take the first replica); keep ``rows``."""
    merged = pieces[0].clone() if dim is None else torch.cat(pieces, dim=dim)
    if rows is not None:
        merged = merged[:rows].clone()
    return merged


def to_shard_keys(
    hf_key: str, tensor: torch.Tensor, parts: tuple[str, ...]
) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF tensor as shard tensors: fused tensors (``c_attn``) are cut into equal parts along dim 0."""
    if len(parts) == 1:
        yield parts[0], tensor
        return
    if tensor.shape[0] % len(parts):
        raise CheckpointError(f"{hf_key}: shape {tuple(tensor.shape)} does not hold {len(parts)} equal parts")
    yield from zip(parts, torch.chunk(tensor, len(parts), dim=0))


def source_head(source: TensorLookup) -> str:
    """``"scalar"`` for the state of an HF ``...ForSequenceClassification`` with one label (``score.weight``
    ``[1, dim]``: a verifier or critic merged by ``checkpoint_split.py --merge``, or a reward model), else
    ``"lm"``. A score layer with several labels is refused: a verifier has one score."""
    keys = set(source.keys())
    if "score.weight" not in keys or "lm_head.weight" in keys:
        return "lm"
    labels = source.get("score.weight").shape[0]
    if labels != 1:
        raise CheckpointError(
            f"score.weight has {labels} labels: a verifier or reward model has one (num_labels=1)"
        )
    return "scalar"


def iter_shard_tensors(
    source: TensorLookup, args: ModelArgs, n: int, head: str = "lm"
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(shard key, its N pieces) for every tensor of ``source``, one at a time; every key must be known
    to the family's key map (with ``head="scalar"``: ``score`` instead of ``lm_head``) and every key of the
    map present."""
    check_divisible(args, n)
    table = concrete_key_map(args, head)
    present = set(source.keys())
    unknown = sorted(k for k in present - set(table) if not IGNORED_KEYS.match(k))
    if args.tie_word_embeddings:
        unknown = [k for k in unknown if k != "lm_head.weight"]  # a saved copy of the tied weight
    if unknown:
        raise CheckpointError(f"keys not in the {args.family} key map: {', '.join(unknown[:5])}")
    missing = [k for k in table if k not in present]
    if missing:
        raise CheckpointError(f"the {args.family} checkpoint lacks {len(missing)} keys, e.g. {missing[0]}")
    padded = args.padded_vocab_size(n)
    for hf_key, parts in table.items():
        for key, tensor in to_shard_keys(hf_key, source.get(hf_key), parts):
            rows = padded if is_vocab_split(key, args) else None
            yield key, split_tensor(tensor, shard_dim(key, args), n, rows)


def split_state(
    source: TensorLookup, args: ModelArgs, n: int, ranks: Iterable[int], head: str = "lm"
) -> dict[int, dict]:
    """The state dicts of the shards ``ranks`` (of N), in memory (only those ranks' pieces are kept)."""
    ranks = list(ranks)
    shards: dict[int, dict] = {r: {} for r in ranks}
    for key, pieces in iter_shard_tensors(source, args, n, head):
        for r in ranks:
            shards[r][key] = pieces[r].contiguous()
    return shards


def merge_shards(
    shards: list[dict[str, torch.Tensor]], args: ModelArgs, head: str = "lm", where: str = "shard 0"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, full tensor) from the N shard state dicts, one at a time (a scalar head: ``score``).

    ``where`` names the first shard in the error raised when it lacks a key.
    """
    for hf_key, parts in concrete_key_map(args, head).items():
        pieces = []
        for key in parts:
            if key not in shards[0]:
                raise CheckpointError(f"{where} lacks {key}")
            rows = args.vocab_size if is_vocab_split(key, args) else None
            pieces.append(merge_tensors([s[key] for s in shards], shard_dim(key, args), rows))
        yield hf_key, pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
