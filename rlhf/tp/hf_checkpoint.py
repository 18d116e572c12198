"""Hugging Face checkpoint files: reading weights one tensor at a time, config.json, writing safetensors.

A checkpoint to split is a single weight file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``: any dict of
tensors) or an HF model dir (``model.safetensors``, ``pytorch_model.bin``, or several files with their
``*.index.json``). :class:`TensorSource` reads it tensor by tensor: safetensors stream, pickles are
memory-mapped where possible and always loaded with ``weights_only=True``. A missing, truncated or
malformed file is a :class:`~rlhf.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhf.backend.state_files import read_file
from rlhf.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
LOAD_ORDER = ("model.safetensors", INDEX_FILES[0], "pytorch_model.bin", INDEX_FILES[1])


def read_json(path: Path) -> object:
    """A JSON file; unreadable or malformed -> one line naming it."""
    return read_file(Path(path), lambda p: json.loads(p.read_text()))


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped; a damaged file fails again
        return torch.load(path, map_location="cpu", weights_only=True)


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A pickled dict of tensors (``torch.save``; unwrapped from ``state_dict``/``model``/``module``),
    memory-mapped when it is a zip archive. Missing, truncated or not a dict of tensors -> CheckpointError."""
    state = read_file(Path(path), _torch_load)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a dict of tensors")
    return state


class TensorSource:
    """Tensors by name from a weight file or an HF model dir, loaded one at a time."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # key -> file holding it
        self._open: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TensorSource:
        path = Path(path)
        if path.is_dir():  # transformers' order: safetensors before .bin, a whole file before an index
            for name in LOAD_ORDER:
                if not (path / name).is_file():
                    continue
                if name not in INDEX_FILES:
                    return cls.open(path / name)
                data = read_json(path / name)
                weight_map = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{path / name}: no weight_map")
                return cls({k: path / f for k, f in weight_map.items()})
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
                self._open[path] = read_file(path, lambda p: safe_open(str(p), framework="pt"))
            else:
                self._open[path] = load_tensor_file(path)
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        handle = self._handle(path)
        if not hasattr(handle, "get_tensor"):
            return handle[key]
        return read_file(path, lambda _: handle.get_tensor(key))  # a truncated file fails on its tensors


def read_hf_config(config_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(config.json as written, the same with library defaults filled in) of a model dir."""
    path = Path(config_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{config_dir}: no config.json (the architecture of the checkpoint)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:  # the original Qwen, or a model type of its own: the raw dict
        return raw, raw  # (the TP backend implements its families itself and never runs a checkpoint's code)
    # transformers' own config class for the type: an ``auto_map`` in config.json is not followed
    return raw, {**raw, **CONFIG_MAPPING[model_type].from_pretrained(config_dir).to_dict()}


# The records of the run that wrote a model dir (the Trainer's, PPO's, ours), not part of the model: a
# converted or trained copy would pass them off as its own (``rlhf.plot`` would draw the old run's curves).
SOURCE_RUN_FILES = frozenset({"trainer_state.json", "metrics.jsonl", "results.json", "merged_from.json"})


def aux_files(model_dir: Path) -> list[Path]:
    """Tokenizer, generation config, remote code...: every top-level file that holds no weights and is no
    record of the run that wrote the dir (:data:`SOURCE_RUN_FILES`, ``*_results.json``)."""
    not_aux = {"config.json", "params.json"}
    return [
        p
        for p in sorted(Path(model_dir).iterdir())
        if p.is_file()
        and p.name not in not_aux
        and p.name not in SOURCE_RUN_FILES
        and not p.name.endswith("_results.json")  # all_, train_, eval_results.json
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.endswith(".index.json")
        and not p.name.startswith(".")
    ]


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
    (out_dir / INDEX_FILES[0]).write_text(json.dumps(index, indent=2) + "\n")


def _flush(state: dict[str, torch.Tensor], out_dir: Path, number: int) -> str:
    name = f"part-{number}.safetensors"
    save_file(state, str(out_dir / name), metadata={"format": "pt"})
    state.clear()
    return name
