"""Which ``checkpoint-N`` folders of a Trainer-based stage can be resumed from, checked before training.

A checkpoint can be damaged after it was published (a disk filled up, a copy was cut short, a file was
truncated by hand). The Trainer would only find out while loading it, with a traceback that never names
the file. :func:`checkpoint_problem` reads each file a resume loads, cheaply:

- ``*.safetensors`` (``adapter_model``, ``model`` and its shards): header and every tensor, which must be
  finite;
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and ``*.bin`` weights: ``torch.load(weights_only=True,
  mmap=True)``, which reads the archive index and the pickled structure but not the tensor data;
- ``rng_state*.pth``: the zip archive index;
- ``trainer_state.json``: valid JSON.

:func:`newest_loadable_checkpoint` walks the checkpoints newest first and skips (with one log line naming
the file) those that fail.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from rlhf.checkpoint_dirs import newest_loadable

logger = logging.getLogger(__name__)

TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
TORCH_WEIGHT_GLOBS = ("pytorch_model*.bin", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"


def _damaged(path: Path, exc: BaseException) -> str:
    first_line = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
    return f"{path.name} is truncated or corrupt ({first_line})"


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if not torch.isfinite(handle.get_tensor(key)).all():
                    return f"{path.name} holds non-finite weights ({key})"
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is damaged
        return _damaged(path, exc)
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        return _damaged(path, exc)
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return _damaged(path, exc)
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return _damaged(path, exc)
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (one phrase naming the file), or None when it loads."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "no such checkpoint directory"
    checks = [(path, _safetensors_problem) for path in sorted(checkpoint.glob("*.safetensors"))]
    checks += [(checkpoint / name, _torch_file_problem) for name in TORCH_STATE_FILES]
    checks += [(path, _torch_file_problem) for glob in TORCH_WEIGHT_GLOBS for path in checkpoint.glob(glob)]
    checks += [(path, _zip_problem) for path in sorted(checkpoint.glob("rng_state*.pth"))]
    checks.append((checkpoint / TRAINER_STATE, _json_problem))
    for path, check in checks:
        if path.is_file():
            problem = check(path)
            if problem is not None:
                return problem
    return None


def newest_loadable_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that loads or None, ``"checkpoint-N: <problem>"`` for each newer one skipped).

    Each skipped checkpoint is logged as a warning.
    """
    return newest_loadable(output_dir, checkpoint_problem)
