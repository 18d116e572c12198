"""Whole directories, what ``checkpoint_split.py`` runs: an HF checkpoint -> a shard dir, and back.

- :func:`split_to_dir`: a weight file or HF model dir -> ``params.json`` + ``consolidated.NN.pth`` +
  tokenizer (:mod:`rlhf.tp.shard_dir`); a ``...ForSequenceClassification`` dir (a merged verifier or
  critic) becomes a scalar-head shard dir again; several processes may share the shards (rank r writes shards
  r, r + W, ...). Tensors stream one at a time and a process keeps only the shards it writes, so the
  whole model is never held twice.
- :func:`merge_to_dir`: a shard dir -> an HF model dir that ``from_pretrained`` loads (config.json,
  safetensors, tokenizer): the causal LM, or for a scalar-head dir the family's
  ``...ForSequenceClassification``.

Both check the output path up front (a regular file, or a non-empty dir without ``--overwrite``, is a
one-line error) and publish it atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from rlhf.args import check_output_dir
from rlhf.errors import CheckpointError
from rlhf.models.loading import is_adapter_dir
from rlhf.publish import publish_dir, staging_dir
from rlhf.tp.convert_weights import merge_shards, source_head, split_state
from rlhf.tp.hf_checkpoint import TensorSource, aux_files, read_hf_config, write_safetensors
from rlhf.tp.key_maps import (
    check_divisible,
    model_args_from_hf,
    model_args_from_params,
    sequence_classification_config,
)
from rlhf.tp.model import ModelArgs
from rlhf.tp.shard_dir import (
    collective_staging,
    is_shard_dir,
    load_all_shards,
    shard_name,
    write_metadata,
    write_shard,
)

logger = logging.getLogger(__name__)


def check_save_path(save_path: str | os.PathLike, overwrite: bool, source: str | os.PathLike) -> None:
    """``--save_path`` must be a dir (or not exist yet), empty unless ``overwrite``, and neither the
    checkpoint it is written from nor a dir that holds it: replacing it would delete the source."""
    check_output_dir(save_path, "--save_path")
    path, source = Path(save_path).resolve(), Path(source).resolve()
    if path == source or path in source.parents:
        raise CheckpointError(
            f"--save_path {save_path} is or holds the checkpoint it would be written from ({source}): "
            "writing it replaces that dir; give another --save_path"
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{save_path} exists and is not empty (pass --overwrite to replace it)")


def split_to_dir(
    ckpt: str | os.PathLike,
    save_path: str | os.PathLike,
    n: int,
    *,
    config_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> ModelArgs:
    """Split a checkpoint file or HF dir into ``save_path``; with W processes, rank r writes shards r, r+W..."""
    ckpt = Path(ckpt)
    if is_shard_dir(ckpt) and "n_shards" in (ckpt / "params.json").read_text():  # ours, not Meta's
        raise CheckpointError(
            f"{ckpt}: already a shard dir (params.json, consolidated.NN.pth): the TP commands take it as it is; "
            f"to split it another way, merge it first (checkpoint_split.py --merge --ckpt_dir {ckpt} --save_path "
            "HF_DIR) and split HF_DIR"
        )
    if is_adapter_dir(ckpt):
        raise CheckpointError(
            f"{ckpt}: a PEFT adapter dir, not a model: the TP commands take it as --ckpt_dir as it is (merged "
            "onto its base in memory); to split it, merge it into its base first (peft's merge_and_unload, then "
            "save_pretrained) and split that dir"
        )
    config_dir = Path(config_dir) if config_dir else (ckpt if ckpt.is_dir() else ckpt.parent)
    check_save_path(save_path, overwrite, ckpt)
    raw, full = read_hf_config(config_dir)
    args = model_args_from_hf(full)
    check_divisible(args, n)
    source = TensorSource.open(ckpt)
    head = source_head(source)  # a merged verifier / critic (score.weight) splits back to a scalar head
    with collective_staging(save_path) as tmp:
        for shard, state in split_state(source, args, n, range(rank, n, world_size), head).items():
            write_shard(state, tmp, shard)
            logger.info("wrote %s (%d tensors)", shard_name(shard), len(state))
        if rank == 0:
            write_metadata(tmp, args, n, raw, config_dir, head if head == "scalar" else None)
    if rank == 0:
        logger.info("split %s into %d shards in %s", ckpt, n, save_path)
    return args


def merge_checkpoint(shard_dir: str | os.PathLike, out_dir: Path, max_shard_gb: float = 5.0) -> ModelArgs:
    """Write an HF model dir (config.json, safetensors, tokenizer) from a shard dir into ``out_dir``: the
    original causal LM, or for a scalar-head (verifier / critic) dir its ``...ForSequenceClassification``."""
    params, shards = load_all_shards(shard_dir)
    args, head = model_args_from_params(params), params.get("head", "lm")
    config = sequence_classification_config(params["hf_config"]) if head == "scalar" else params["hf_config"]
    tensors = merge_shards(shards, args, head, where=str(Path(shard_dir) / shard_name(0)))
    write_safetensors(tensors, out_dir, int(max_shard_gb * 2**30))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in aux_files(Path(shard_dir)):
        shutil.copy2(path, out_dir / path.name)
    return args


def merge_to_dir(
    shard_dir: str | os.PathLike,
    save_path: str | os.PathLike,
    overwrite: bool = False,
    max_shard_gb: float = 5.0,
) -> ModelArgs:
    """Merge a shard dir into an HF model dir at ``save_path`` (written to a staging dir, then renamed)."""
    check_save_path(save_path, overwrite, shard_dir)
    save_path = Path(save_path)
    tmp = staging_dir(save_path)
    args = merge_checkpoint(shard_dir, tmp, max_shard_gb)
    publish_dir(tmp, save_path)
    logger.info("merged %s into %s", shard_dir, save_path)
    return args
