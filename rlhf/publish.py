"""Atomic publishing: a directory or file appears under its final name only when completely written.

Every writer of checkpoints and outputs goes through these three functions, so a kill at any moment leaves
either the previous version or the new one, never a half-written one:

- :func:`staging_dir` gives the hidden sibling ``.NAME.tmp`` to write into (emptied first);
- :func:`publish_dir` renames a finished staging dir into place, replacing what was there;
- :func:`write_text_atomic` does the same for one text file.

Writing into a sibling keeps the rename on one filesystem (``os.replace`` is atomic there).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temp file and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
