"""Atomic publishing: a directory or file appears under its final name only when completely written.

Every writer of checkpoints and outputs goes through these functions, so a kill at any moment leaves
either the previous version or the new one, never a half-written one:

- :func:`staging_dir` gives the hidden sibling ``.NAME.tmp`` to write into (emptied first);
- :func:`publish_dir` renames a finished staging dir into place, replacing what was there;
- :func:`publish_model_files` moves a saved model's files into a directory that holds other things too
  (an output dir with its checkpoints), file by file, and removes an earlier model's files it replaced:
  in between, the directory loads as no model (an error), never as a mix of the two;
- :func:`publish_files` moves finished files into a directory, each by one rename, removing nothing;
- :func:`write_text_atomic` does the same for one text file.

Writing into a sibling keeps the rename on one filesystem (``os.replace`` is atomic there). Each
function flushes what it publishes to the disk (``fsync`` of every staged file and directory) before the
rename, and the directory that holds the new name after it: a power loss or a crash of the machine leaves
the previous version or the new one too, not a name over empty or truncated files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to the disk, where the platform and filesystem allow."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # filesystems that cannot sync a directory
        pass
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """``fsync`` every file and directory under ``root`` (or the file ``root``), deepest first."""
    root = Path(root)
    if not root.is_dir():
        _fsync(root)
        return
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def staging_path(final: Path) -> Path:
    """Where :func:`staging_dir` stages ``final`` (for processes that write into it without creating it)."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp"


def staging_dir(final: Path) -> Path:
    """An empty ``.NAME.tmp`` next to ``final`` (created, leftovers of an earlier kill removed)."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(staging: Path, final: Path) -> None:
    """Put the finished ``staging`` dir in place of ``final`` (replacing an existing one).

    An existing ``final`` is first renamed to ``.NAME.old`` and removed after the new one is in place, so
    at every moment one complete version exists under ``final`` or ``.NAME.old``."""
    staging, final = Path(staging), Path(final)
    sync_tree(staging)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
        _fsync(final.parent)


# The files of a saved model or adapter (transformers' and peft's names). A model saved into a directory
# replaces the whole set: a file of an earlier save that the new one does not write (its adapter beside new
# full weights, or its full weights under a new adapter) would make the directory load as another model.
MODEL_FILE_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
    "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


# What a loader reads first to decide what a directory is: a PEFT adapter (adapter_config.json, which
# names its base) or a full model (config.json). Published last and removed first, in this order.
ENTRY_FILES = ("adapter_config.json", "config.json")


def _move(entry: Path, dest: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        publish_dir(entry, dest)
    else:
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)


def publish_model_files(staging: Path, target: Path) -> list[str]:
    """Move every entry of the finished ``staging`` dir into ``target`` (a file renamed over its old
    version, a directory through :func:`publish_dir`), remove ``staging`` and the model files
    (:data:`MODEL_FILE_PATTERNS`) of ``target`` that it did not bring; returns their names, sorted.

    Other entries of ``target`` (checkpoints, logs) are left as they are. The order keeps a kill at any
    moment from leaving a directory that loads as a mix of the two models, or as the old one beside new
    files: the old entry files (:data:`ENTRY_FILES`) go first (from then on the directory loads as no
    model, loudly), then the old model files the new save does not bring, then the new files, and the new
    entry files last (the adapter's config before ``config.json``, which alone would read as a full
    model)."""
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    written = {entry.name for entry in staging.iterdir()}
    stale = sorted({p.name for pattern in MODEL_FILE_PATTERNS for p in target.glob(pattern)} - written)
    for name in ENTRY_FILES:
        if (target / name).is_file():
            (target / name).unlink()
    for name in stale:
        (target / name).unlink(missing_ok=True)
    publish_files(staging, target, last=ENTRY_FILES)
    return stale


def publish_files(staging: Path, target: Path, last: tuple[str, ...] = ()) -> None:
    """Move every entry of the finished ``staging`` dir into ``target`` (each rename atomic; the names in
    ``last`` after all others, in that order), then remove ``staging``; nothing else in ``target`` changes
    (a tokenizer beside a published model)."""
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    entries = [entry for entry in sorted(staging.iterdir()) if entry.name not in last]
    entries += [staging / name for name in last if (staging / name).exists()]
    sync_tree(staging)
    for entry in entries:
        _move(entry, target / entry.name)
    _fsync(target)
    shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temp file and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
