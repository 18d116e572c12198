"""Splitting Hugging Face checkpoints into tensor-parallel shards and merging them back.

A shard directory holds ``consolidated.00.pth`` ... ``consolidated.{N-1}.pth`` (one state dict per rank,
shard key names), ``params.json`` (:func:`rlhf.tp.key_maps.params_dict`), the source's ``config.json`` and
its tokenizer and other non-weight files, so it is self-contained. ``params.json`` marks it as a shard dir.

Memory: tensors stream one at a time from safetensors (or a memory-mapped pickle); a process only keeps
the shards it writes, so the whole model is never held twice. Pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhf.errors import CheckpointError
from rlhf.tp.key_maps import (
    IGNORED_KEYS,
    check_divisible,
    concrete_key_map,
    is_vocab_split,
    model_args_from_hf,
    model_args_from_params,
    params_dict,
    sequence_classification_config,
    shard_dim,
)
from rlhf.tp.model import ModelArgs

logger = logging.getLogger(__name__)

PARAMS = "params.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
NOT_AUX = {"config.json", PARAMS}


def shard_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.pth"


# ---------------------------------------------------------------- pure split / merge


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


# ---------------------------------------------------------------- reading checkpoints


class TensorSource:
    """Tensors by name from a file or an HF model dir, loaded one at a time."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # key -> file holding it
        self._open: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TensorSource:
        path = Path(path)
        if path.is_dir():
            for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
                if (path / index).is_file():
                    weight_map = json.loads((path / index).read_text())["weight_map"]
                    return cls({k: path / f for k, f in weight_map.items()})
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).is_file():
                    return cls.open(path / name)
            raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or index file")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{path}: expected a .safetensors, .bin, .pth or .pt file")
        source = cls({})
        source.files = dict.fromkeys(source._handle(path).keys(), path)
        return source

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open[path] = _load_pickle(path)
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self.files[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a dict of tensors")
    return state


class DictSource(TensorSource):
    """A state dict already in memory (e.g. an HF model with a LoRA adapter merged in)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__({})
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


def read_hf_config(config_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(config.json as written, the same with library defaults filled in) of a model dir."""
    path = Path(config_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{config_dir}: no config.json (the architecture of the checkpoint)")
    raw = json.loads(path.read_text())
    full = raw
    if raw.get("model_type") != "qwen":  # the original Qwen needs remote code; its raw dict is enough
        from transformers import AutoConfig

        full = {**raw, **AutoConfig.from_pretrained(config_dir).to_dict()}
    return raw, full


# ---------------------------------------------------------------- splitting


def iter_shard_tensors(
    source: TensorSource, args: ModelArgs, n: int
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(shard key, its N pieces) for every tensor of ``source``, streamed; checks every key is known/present."""
    check_divisible(args, n)
    table = concrete_key_map(args)
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


def split_state(source: TensorSource, args: ModelArgs, n: int, ranks: Iterable[int]) -> dict[int, dict]:
    """The state dicts of the shards ``ranks`` (of N), in memory."""
    ranks = list(ranks)
    shards: dict[int, dict] = {r: {} for r in ranks}
    for key, pieces in iter_shard_tensors(source, args, n):
        for r in ranks:
            shards[r][key] = pieces[r].contiguous()
    return shards


def aux_files(model_dir: Path) -> list[Path]:
    """Tokenizer, generation config, remote code...: every top-level file that holds no weights."""
    return [
        p
        for p in sorted(model_dir.iterdir())
        if p.is_file()
        and p.name not in NOT_AUX
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.endswith(".index.json")
        and not p.name.startswith(".")
    ]


def staging_dir(save_path: Path) -> Path:
    return save_path.parent / f".{save_path.name}.tmp"


def prepare_output(save_path: Path, overwrite: bool) -> Path:
    """A fresh staging dir next to ``save_path``; refuse to clobber a non-empty dir unless ``overwrite``."""
    if save_path.exists() and any(save_path.iterdir()) and not overwrite:
        raise CheckpointError(f"{save_path} exists and is not empty (pass --overwrite to replace it)")
    tmp = staging_dir(save_path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, save_path: Path) -> None:
    """Atomically put the finished staging dir in place of ``save_path``."""
    if save_path.exists():
        old = save_path.parent / f".{save_path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(save_path, old)
        os.replace(tmp, save_path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, save_path)


def write_shard(state: dict[str, torch.Tensor], directory: Path, rank: int) -> None:
    torch.save(state, directory / shard_name(rank))


def write_metadata(directory: Path, args: ModelArgs, n: int, hf_config: dict, aux_dir: Path | None) -> None:
    """``params.json``, the source's config.json (tokenizer loaders read it) and its tokenizer files."""
    (directory / PARAMS).write_text(json.dumps(params_dict(args, n, hf_config), indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for path in aux_files(aux_dir) if aux_dir is not None else []:
        shutil.copy2(path, directory / path.name)


def split_checkpoint(
    source: TensorSource, hf_config: dict, full_config: dict, n: int, out_dir: Path, ranks: Iterable[int]
) -> ModelArgs:
    """Write the shards ``ranks`` of an N-way split of ``source`` into ``out_dir`` (a staging dir)."""
    args = model_args_from_hf(full_config)
    for rank, state in split_state(source, args, n, ranks).items():
        write_shard(state, out_dir, rank)
        logger.info("wrote %s (%d tensors)", shard_name(rank), len(state))
    return args


# ---------------------------------------------------------------- shard dirs


def read_params(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / PARAMS
    if not path.is_file():
        raise CheckpointError(f"{shard_dir}: no {PARAMS} (not a shard dir written by checkpoint_split.py)")
    return json.loads(path.read_text())


def shard_files(shard_dir: str | os.PathLike, n: int) -> list[Path]:
    files = sorted(Path(shard_dir).glob("consolidated.*.pth"))
    expected = [Path(shard_dir) / shard_name(r) for r in range(n)]
    if files != expected:
        raise CheckpointError(
            f"{shard_dir}: params.json says {n} shards, found {len(files)} consolidated.*.pth"
        )
    return files


def load_shard(shard_dir: str | os.PathLike, rank: int, world_size: int) -> tuple[ModelArgs, dict]:
    """(architecture, this rank's state dict) of a shard dir; its shard count must equal the world size."""
    params = read_params(shard_dir)
    n = params["n_shards"]
    if n != world_size:
        raise CheckpointError(
            f"{shard_dir} holds {n} shards but the model-parallel world size is {world_size} "
            f"(run with --nproc_per_node {n}, or re-split with checkpoint_split.py --n {world_size})"
        )
    files = shard_files(shard_dir, n)
    state = torch.load(files[rank], map_location="cpu", weights_only=True, mmap=True)
    return model_args_from_params(params), state


# ---------------------------------------------------------------- merging


def merged_hf_tensors(shard_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, full tensor) for every weight of a shard dir, one at a time (a scalar-head dir: ``score``)."""
    params = read_params(shard_dir)
    args = model_args_from_params(params)
    n = params["n_shards"]
    shards = [
        torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in shard_files(shard_dir, n)
    ]
    for hf_key, parts in concrete_key_map(args, params.get("head", "lm")).items():
        pieces = []
        for key in parts:
            if key not in shards[0]:
                raise CheckpointError(f"{shard_dir}: {shard_name(0)} lacks {key}")
            rows = args.vocab_size if is_vocab_split(key, args) else None
            pieces.append(merge_tensors([s[key] for s in shards], shard_dim(key, args), rows))
        yield hf_key, pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_bytes: int) -> None:
    """HF-style ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + index past ``max_bytes``)."""
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[str] = []
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_bytes:
            names.append(_flush(files[-1], out_dir, len(files)))
            files.append({})
            size = 0
        files[-1][key] = tensor.contiguous()
        size += nbytes
    names.append(_flush(files[-1], out_dir, len(files)))
    if len(names) == 1:
        os.replace(out_dir / names[0], out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, name in enumerate(names, start=1):
        final = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        os.replace(out_dir / name, out_dir / final)
        weight_map.update(dict.fromkeys(safe_open(str(out_dir / final), "pt").keys(), final))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _flush(state: dict[str, torch.Tensor], out_dir: Path, number: int) -> str:
    name = f"part-{number}.safetensors"
    save_file(state, str(out_dir / name), metadata={"format": "pt"})
    state.clear()
    return name


def merge_checkpoint(shard_dir: str | os.PathLike, out_dir: Path, max_shard_gb: float = 5.0) -> ModelArgs:
    """Write an HF model dir (config.json, safetensors, tokenizer) from a shard dir into ``out_dir``: the
    original causal LM, or for a scalar-head (verifier / critic) dir its ``...ForSequenceClassification``."""
    shard_dir = Path(shard_dir)
    params = read_params(shard_dir)
    config = params["hf_config"]
    if params.get("head", "lm") == "scalar":
        config = sequence_classification_config(config)
    write_safetensors(merged_hf_tensors(shard_dir), out_dir, int(max_shard_gb * 2**30))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in aux_files(shard_dir):
        shutil.copy2(path, out_dir / path.name)
    return model_args_from_params(params)


# ---------------------------------------------------------------- whole-directory commands


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
    from rlhf.tp.distributed import barrier

    ckpt, save_path = Path(ckpt), Path(save_path)
    config_dir = Path(config_dir) if config_dir else (ckpt if ckpt.is_dir() else ckpt.parent)
    raw, full = read_hf_config(config_dir)
    args = model_args_from_hf(full)
    check_divisible(args, n)
    source = TensorSource.open(ckpt)
    tmp = staging_dir(save_path)
    if rank == 0:
        prepare_output(save_path, overwrite)
    barrier()
    split_checkpoint(source, raw, full, n, tmp, range(rank, n, world_size))
    barrier()
    if rank == 0:
        write_metadata(tmp, args, n, raw, config_dir)
        publish(tmp, save_path)
        logger.info("split %s into %d shards in %s", ckpt, n, save_path)
    barrier()
    return args


def merge_to_dir(
    shard_dir: str | os.PathLike,
    save_path: str | os.PathLike,
    overwrite: bool = False,
    max_shard_gb: float = 5.0,
) -> ModelArgs:
    """Merge a shard dir into an HF model dir at ``save_path`` (written to a staging dir, then renamed)."""
    save_path = Path(save_path)
    tmp = prepare_output(save_path, overwrite)
    args = merge_checkpoint(shard_dir, tmp, max_shard_gb)
    publish(tmp, save_path)
    logger.info("merged %s into %s", shard_dir, save_path)
    return args


def source_hf_config(ckpt_dir: str | os.PathLike) -> dict:
    """The original config.json of a shard dir (from params.json) or of an HF model dir."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / PARAMS).is_file():
        return read_params(ckpt_dir)["hf_config"]
    return read_hf_config(ckpt_dir)[0]


def save_model_shards(
    model: torch.nn.Module, save_path: str | os.PathLike, source_dir: str | os.PathLike, head: str = "lm"
) -> None:
    """Save a running TP model as a shard dir: each rank writes its shard, rank 0 ``params.json`` + tokenizer.

    Call on every rank, after :func:`rlhf.tp.lora.merge_lora` when the model carries LoRA weights.
    ``source_dir`` (the dir the model was loaded from) supplies config.json and the tokenizer files;
    ``head`` ("lm" or "scalar") is recorded in ``params.json``. Written to a staging dir, then renamed.
    """
    import fairscale.nn.model_parallel.initialize as fs_init

    from rlhf.tp.distributed import barrier

    save_path = Path(save_path)
    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    if any(".lora_" in k for k in state):
        raise CheckpointError("merge the LoRA weights (rlhf.tp.lora.merge_lora) before saving shards")
    tmp = staging_dir(save_path)
    if rank == 0:
        prepare_output(save_path, overwrite=True)
    barrier()
    write_shard(state, tmp, rank)
    barrier()
    if rank == 0:
        write_metadata(tmp, model.args, world_size, source_hf_config(source_dir), Path(source_dir))
        params = json.loads((tmp / PARAMS).read_text())
        (tmp / PARAMS).write_text(json.dumps({**params, "head": head}, indent=2) + "\n")
        publish(tmp, save_path)
        logger.info("saved %d shards to %s", world_size, save_path)
    barrier()
