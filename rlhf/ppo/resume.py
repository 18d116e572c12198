"""Where a PPO run (or a TP ``solver_train`` / ``verifier_train`` run, whose checkpoints have the same
files: :mod:`rlhf.tp.train_checkpoint`) starts: the newest checkpoint in ``--output_dir``, a named one, or
afresh with ``--overwrite_output_dir``, as in the SFT and reward-model stages (:mod:`rlhf.training.outputs`).

- ``--resume_from_checkpoint DIR`` resumes from DIR (``True``: from the newest loadable ``checkpoint-N``);
- otherwise an ``--output_dir`` holding ``checkpoint-N`` dirs is resumed from its newest loadable one
  (damaged ones are skipped with a warning naming the file), so re-running a command continues it;
- with ``--overwrite_output_dir`` the run starts at step 1 and the old checkpoints and ``metrics.jsonl``
  are removed first (:func:`start_afresh`, after the models are built, so a failed start deletes nothing).

The log says which.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.backend import Backend
from rlhf.checkpoint_dirs import asks_for_newest
from rlhf.errors import CheckpointError, ConfigError
from rlhf.ppo.checkpoint import checkpoint_dirs, checkpoint_problem, newest_loadable_checkpoint
from rlhf.ppo.config import PPOTrainingArguments

if TYPE_CHECKING:
    from rlhf.tp.train_args import TPTrainArguments

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def resume_checkpoint(args: PPOTrainingArguments | TPTrainArguments) -> str | None:
    """The checkpoint this run resumes from, or ``None`` to start afresh (``args``: anything with
    ``output_dir``, ``resume_from_checkpoint`` and ``overwrite_output_dir``). Checked up front, before any
    model loads: a named checkpoint that is missing or damaged is a one-line error."""
    out = Path(args.output_dir)
    named = args.resume_from_checkpoint
    if named and asks_for_newest(named):
        newest = newest_loadable_checkpoint(out) if out.is_dir() else None
        if newest is None:
            raise CheckpointError(f"--resume_from_checkpoint {named}: no loadable checkpoint-N in {out}")
        logger.info("resuming from %s (the newest checkpoint)", newest)
        return str(newest)
    if named:
        if not Path(named).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {named}: no such checkpoint directory")
        problem = checkpoint_problem(Path(named))
        if problem is not None:
            raise CheckpointError(f"--resume_from_checkpoint {named}: {problem}")
        logger.info("resuming from %s", named)
        return named
    if not out.is_dir() or not checkpoint_dirs(out):
        return None
    if args.overwrite_output_dir:
        logger.info("--overwrite_output_dir: starting afresh in %s (its old checkpoints are removed)", out)
        return None
    newest = newest_loadable_checkpoint(out)
    if newest is None:
        raise CheckpointError(
            f"--output_dir {out}: no checkpoint-N there loads; pass --overwrite_output_dir to start afresh"
        )
    logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", newest)
    return str(newest)


def start_afresh(output_dir: Path, backend: Backend) -> None:
    """Remove the ``checkpoint-N`` dirs and ``metrics.jsonl`` of an earlier run (main process; all wait)."""
    if backend.is_main:
        old = checkpoint_dirs(output_dir)
        for directory in old:
            shutil.rmtree(directory, ignore_errors=True)
        metrics = output_dir / METRICS_FILE
        if old or metrics.exists():
            logger.info("removed %d old checkpoint(s) and %s from %s", len(old), METRICS_FILE, output_dir)
        metrics.unlink(missing_ok=True)
    backend.barrier()
