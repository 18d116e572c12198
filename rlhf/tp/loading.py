"""A model for this rank from a shard dir (``params.json`` + ``consolidated.NN.pth``) or a plain HF dir.

An HF dir (what the ``run_*`` scripts save, optionally with ``--peft_path`` or as an adapter dir) is split in
memory through the same key maps as ``checkpoint_split.py``; each rank keeps only its own shard. A base with
an adapter merged in memory first gets the keys of its files back (transformers fuses a Mixtral's experts in
memory: :func:`rlhf.tp.key_maps.file_layout_state`). An HF ``...ForSequenceClassification`` dir with one
label (a verifier merged by ``checkpoint_split.py --merge``) loads as a scalar-head model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlhf.errors import CheckpointError, ConfigError
from rlhf.models.loading import is_adapter_dir
from rlhf.tp.convert_weights import StateDictLookup, TensorLookup, source_head, split_state
from rlhf.tp.hf_checkpoint import TensorSource, read_hf_config
from rlhf.tp.key_maps import (
    check_divisible,
    check_preset,
    file_layout_state,
    model_args_from_hf,
    model_args_from_params,
)
from rlhf.tp.model import ModelArgs, ScalarHeadTransformer, Transformer
from rlhf.tp.shard_dir import PARAMS, check_shard_dir, is_shard_dir, load_shard, read_params, source_aux_files

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_tp_dtype(name: str | None, device: torch.device, training: bool = False) -> torch.dtype:
    """``auto``: bfloat16 on GPU, float32 on CPU; half precision on CPU falls back to float32.

    ``training``: float16 is refused. The TP trainers have no loss scaler, so float16 gradients underflow
    (AdamW itself steps float32 masters of half-precision weights: :class:`rlhf.optimizer.MasterWeightAdamW`).
    """
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CheckpointError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    if training and name == "float16":
        raise ConfigError(
            "--dtype float16: the tensor-parallel trainers have no fp16 loss scaling (float16 gradients "
            "underflow); train in bfloat16 (the GPU default) or float32"
        )
    if device.type == "cpu" and name != "float32":
        logger.warning("--dtype %s needs a GPU; float32 is used on CPU", name)
        return torch.float32
    return DTYPES[name]


def load_rank_state(
    ckpt_dir: str, rank: int, world_size: int, peft_path: str | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor], str]:
    """(architecture, this rank's shard state dict, where it came from) for any supported checkpoint dir."""
    path = Path(ckpt_dir)
    if is_shard_dir(path):
        if peft_path:
            raise CheckpointError("--peft_path applies to an HF model dir, not to a shard dir")
        args, state = load_shard(path, rank, world_size)
        return args, state, f"{path}/{PARAMS}"
    if is_adapter_dir(path) or peft_path:
        from rlhf.models.loading import adapter_base_path, load_causal_lm

        adapter = str(path) if is_adapter_dir(path) else peft_path
        base = adapter_base_path(adapter) if is_adapter_dir(path) else str(path)
        if not is_adapter_dir(adapter):
            raise CheckpointError(f"{adapter}: not an adapter dir (no adapter_config.json)")
        _, full_config = read_hf_config(base)
        args = model_args_from_hf(full_config)
        model = load_causal_lm(adapter, torch_dtype="float32", merge_adapter=True)
        # in memory transformers may hold tensors fused (a Mixtral's experts); the key maps know the files
        source: TensorLookup = StateDictLookup(file_layout_state(model.state_dict(), args))
        where = f"{base}/config.json"
    else:
        _, full_config = read_hf_config(path)
        args = model_args_from_hf(full_config)
        source = TensorSource.open(path)
        where = f"{path}/config.json"
    check_divisible(args, world_size)
    state = split_state(source, args, world_size, [rank], source_head(source))[rank]
    return args, state, where


def checkpoint_head(ckpt_dir: str) -> str:
    """``"scalar"`` when ``ckpt_dir`` holds a verifier / critic (a shard dir with ``"head": "scalar"``, or
    an HF ``...ForSequenceClassification`` dir with one label), ``"lm"`` for a causal LM (shard, HF or
    adapter dir). Reads ``params.json`` or the weight files' key lists, no tensors but the score layer."""
    if is_shard_dir(ckpt_dir):
        return read_params(ckpt_dir).get("head", "lm")
    if is_adapter_dir(ckpt_dir):
        return "lm"  # loaded as a causal LM onto its base
    return source_head(TensorSource.open(ckpt_dir))


def check_checkpoint(
    ckpt_dir: str, world_size: int, flag: str = "--ckpt_dir", model_type: str | None = None
) -> None:
    """Up-front check of a checkpoint a command loads later, without reading tensors: a local directory
    (``flag`` names it when there is none), a shard dir's ``params.json``, shard count and shard files
    (:func:`rlhf.tp.shard_dir.check_shard_dir`), an HF or adapter dir's config.json, and that ``--model_type``
    describes it. Raises a CheckpointError (a ConfigError for ``--model_type``) naming the file."""
    from rlhf.models.loading import adapter_base_path

    if not Path(ckpt_dir).is_dir():  # not a hub id: these commands read local dirs only
        raise CheckpointError(f"{flag} {ckpt_dir}: no such directory")
    if is_shard_dir(ckpt_dir):
        args, where = model_args_from_params(check_shard_dir(ckpt_dir, world_size)), f"{ckpt_dir}/{PARAMS}"
    else:
        base = adapter_base_path(ckpt_dir) if is_adapter_dir(ckpt_dir) else ckpt_dir
        args, where = model_args_from_hf(read_hf_config(base)[1]), f"{base}/config.json"
    check_preset(model_type, args, where)  # before the data and weights load, not after


def build_model(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    scalar_head: bool = False,
) -> Transformer:
    """Instantiate the TP model and fill it with ``state`` (assigned, not copied: no second copy in memory).

    With ``scalar_head`` the LM head is dropped and a ``v_head`` is kept from ``state`` or zero-initialised.
    """
    model = ScalarHeadTransformer(args) if scalar_head else Transformer(args)
    # the scalar head stays float32 (it trains, and its output is a value or a score): the rest in ``dtype``
    state = {k: v.to(torch.float32 if k == "v_head.weight" else dtype) for k, v in state.items()}
    if scalar_head:
        state.pop("output.weight", None)
        if "v_head.weight" not in state:
            state["v_head.weight"] = torch.zeros(1, args.dim, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device=device)  # parameters already hold their dtype; the RoPE table stays float32


def generation_eos_ids(ckpt_dir: str) -> int | list[int] | None:
    """The ``eos_token_id`` of ``ckpt_dir``'s ``generation_config.json`` (which a split carries over; an adapter
    dir's is its base model's, as the dirs saved from it get): a chat model's end-of-turn ids beside the
    tokenizer's EOS, where Hugging Face ``generate`` also stops. ``None`` without the file or the key."""
    found = [p for p in source_aux_files(ckpt_dir) if p.name == "generation_config.json"]
    if not found:
        return None
    path = found[0]
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a generation config JSON object ({exc})") from None


def load_tp_model(
    ckpt_dir: str,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    model_type: str | None = None,
    peft_path: str | None = None,
    scalar_head: bool = False,
) -> Transformer:
    """This rank's model from ``ckpt_dir``, checked against ``--model_type``."""
    args, state, where = load_rank_state(ckpt_dir, rank, world_size, peft_path)
    check_preset(model_type, args, where)
    if "v_head.weight" in state and not scalar_head:
        raise CheckpointError(f"{ckpt_dir}: a verifier (scalar head), not a causal LM with an output layer")
    model = build_model(args, state, dtype, device, scalar_head=scalar_head)
    if rank == 0:
        n_local = sum(p.numel() for p in model.parameters())
        logger.info("loaded %s (%s, %d parameters on rank 0)", ckpt_dir, args.family, n_local)
    return model
