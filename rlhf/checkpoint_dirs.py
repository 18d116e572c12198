"""The ``checkpoint-N`` dirs of an output dir, newest first, and the newest one that would load.

Shared by the Trainer stages (:mod:`rlhf.training.checkpoints`) and the PPO stage (:mod:`rlhf.ppo.checkpoint`),
which differ only in what makes one of their checkpoints loadable (the ``problem_of`` they pass).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def asks_for_newest(resume_from_checkpoint: str | None) -> bool:
    """Whether a ``--resume_from_checkpoint`` value asks for the newest checkpoint (``True``, ``1``,
    ``yes``) rather than naming one."""
    return str(resume_from_checkpoint).lower() in ("true", "1", "yes")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [path for _, path in sorted((n, p) for n, p in found if p.is_dir())[::-1]]


def named_checkpoint(resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint dir ``--resume_from_checkpoint`` names, or None (unset, or asking for the newest)."""
    return None if asks_for_newest(resume_from_checkpoint) else resume_from_checkpoint


def rotate_checkpoints(
    output_dir: str | Path, limit: int | None, saved: str | Path, best: str | Path | None = None
) -> None:
    """Delete the oldest ``checkpoint-N`` dirs of ``output_dir`` until ``limit`` (``--save_total_limit``)
    are left, never ``saved`` (the checkpoint just written) nor ``best`` (the best model's), as transformers'
    ``rotate_checkpoints`` keeps the newest and the best; but only dirs named exactly ``checkpoint-N`` are
    counted or deleted (its glob also took a user's ``checkpoint-best/`` or ``checkpoint-7-backup/``), and a
    higher-numbered one an earlier run left (a resume from an older checkpoint) goes before ``saved``."""
    if not limit or limit <= 0:
        return
    protected = {Path(saved).resolve(), *([Path(best).resolve()] if best else [])}
    oldest_first = list_checkpoints(output_dir)[::-1]
    remaining = len(oldest_first)
    for checkpoint in oldest_first:
        if remaining <= max(limit, len(protected)):
            break
        if checkpoint.resolve() not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1


def newest_loadable(
    output_dir: str | Path, problem_of: Callable[[Path], str | None]
) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose ``problem_of`` is None, or None; ``"checkpoint-N: <problem>"`` for each
    newer one skipped). Each skipped checkpoint is logged as a warning."""
    skipped = []
    for checkpoint in list_checkpoints(output_dir):
        problem = problem_of(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name}: {problem}")
        logger.warning("skipping %s: %s", checkpoint, problem)
    return None, skipped
