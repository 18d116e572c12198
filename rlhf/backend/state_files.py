"""The files of a checkpoint's trainable state, written and read with errors that name the file.

- ``trainable.safetensors``: every trainable tensor by name (:meth:`PolicyModels.trainable_state`);
- ``optimizer.pt``: optimizer and scheduler states (``torch.load(weights_only=True)``).

Each backend decides *where* they go (one copy for replicated weights, one per rank for sharded ones);
this module is *how*. :func:`check_file` is the cheap integrity test used to pick a checkpoint that
loads, on every process alike and without reading the tensors (at TP degree N, each process would
otherwise read all N ranks' optimizer states): a truncated ``.safetensors`` is shorter than its header
says, a truncated ``.pt``/``.pth`` (a zip archive) has no readable central directory or a member that
ends past the file, a truncated ``.json`` does not parse. The CRCs of a ``.pt`` are checked when its
process loads it (:func:`read_trainable`; ``torch.load`` itself does not), so a file corrupted in the
middle is a one-line error naming it rather than silently wrong optimizer moments.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import CheckpointError

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


def rank_dir(directory: Path, rank: int) -> Path:
    """The per-process sub-directory ``rank_K/`` of a checkpoint."""
    return directory / f"rank_{rank}"


def write_trainable(
    directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]
) -> None:
    """Write ``TRAINABLE`` (tensors moved to CPU, made contiguous) and ``OPTIMIZER`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / TRAINABLE))
    torch.save(optimizer_state, directory / OPTIMIZER)


def read_trainable(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors on CPU, optimizer state) from ``directory``; a missing or unreadable file raises a
    :class:`CheckpointError` naming it."""
    tensors = read_file(directory / TRAINABLE, lambda p: load_file(str(p)))
    state = read_file(directory / OPTIMIZER, load_torch_file_checked)
    return tensors, state


def load_torch_file_checked(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file whose every member's CRC was checked first."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (member {bad} fails its CRC check)")
    return torch.load(path, map_location="cpu", weights_only=True)


def _zip_extent_problem(path: Path) -> str | None:
    """Why the zip archive ``path`` is cut short (its index unreadable, or a member ending past the end
    of the file), or None; reads the index and each member's local header, not the data."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive, path.open("rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                return f"member {info.filename}: no local header at byte {info.header_offset}"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            end = info.header_offset + 30 + name_len + extra_len + info.compress_size
            if end > size:
                return f"truncated (member {info.filename} ends at byte {end} of {size})"
    return None


def load_failure(exc: BaseException) -> str:
    """Why a file did not load, as a phrase: refused by ``torch.load(weights_only=True)`` (it holds an object
    loading would import: a pickle that could run code), or damaged."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = found.group(1) if found else "an object other than tensors and plain data"
        return f"refused: it holds {what}, which loading would import (a pickle that could run code)"
    detail = next(iter(text.strip().splitlines()), "") or type(exc).__name__
    return f"unreadable, truncated or corrupt ({detail})"


def read_file(path: Path, reader) -> Any:
    """``reader(path)``, with a missing or unreadable file reported as one line naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint?)")
    try:
        return reader(path)
    except CheckpointError:
        raise  # the reader's own one-line error names the file already
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the file's fault
        raise CheckpointError(f"{path}: {load_failure(exc)}") from None


def check_file(path: Path) -> str | None:
    """Why ``path`` would not load (a one-line reason), or ``None`` when it looks whole.

    ``.safetensors``: the header parses and the file is as long as the header says; ``.pt``/``.pth``
    (torch's zip format): every member's CRC matches; ``.json``: it parses. Other files pass.
    """
    suffix = path.suffix
    try:
        if suffix == ".safetensors":
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            size = path.stat().st_size
            if size < 8 + header_len + end:
                return f"truncated ({size} of {8 + header_len + end} bytes)"
        elif suffix in (".pt", ".pth"):
            return _zip_extent_problem(path)
        elif suffix == ".json":
            json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the file's fault
        return f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None
