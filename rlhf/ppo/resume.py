"""Where a PPO run (or a TP ``solver_train`` / ``verifier_train`` run, whose checkpoints have the same
files: :mod:`rlhf.tp.train_checkpoint`) starts: the newest checkpoint in ``--output_dir``, a named one, or
afresh with ``--overwrite_output_dir``, as in the SFT and reward-model stages (:mod:`rlhf.training.outputs`).

- ``--resume_from_checkpoint DIR`` resumes from DIR (``True``: from the newest loadable ``checkpoint-N``);
- otherwise an ``--output_dir`` holding ``checkpoint-N`` dirs is resumed from its newest loadable one
  (damaged ones are skipped with a warning naming the file), so re-running a command continues it;
- with ``--overwrite_output_dir`` the run starts at step 1 and the old checkpoints and ``metrics.jsonl``
  are removed first (:func:`start_afresh`, after the models are built, so a failed start deletes nothing).

The log says which. A resumed run must share the checkpoint's recorded settings
(:func:`rlhf.ppo.checkpoint.check_resume_settings`): those its flags and input files decide
(:func:`flag_settings`) are compared here, before any model loads (:func:`check_settings_before_loading`);
the rest (the number of prompts, the adapters' alphas) once the models and data are loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.backend import Backend
from rlhf.backend.state_files import read_file
from rlhf.checkpoint_dirs import asks_for_newest
from rlhf.data.files import files_signature
from rlhf.errors import CheckpointError, ConfigError
from rlhf.ppo.checkpoint import (
    TRAINER_STATE,
    check_resume_settings,
    checkpoint_dirs,
    checkpoint_problem,
    newest_loadable_checkpoint,
)
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments

if TYPE_CHECKING:
    from rlhf.tp.train_args import TPTrainArguments

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"  # --do_eval's responses (rlhf/ppo/evaluation.py)


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


def flag_settings(
    args: PPOTrainingArguments, ppo: PPOArguments, inputs: dict[str, str | None], processes: int | None = None
) -> dict[str, Any]:
    """The settings a resumed PPO run must share that its flags and input files decide: how a rollout
    splits into mini-batches and optimizer steps, the seed, the estimator, the number of processes (the
    samplers count global batches; each process keeps its own rollout) and each input path's files
    (``inputs``: flag -> path, :func:`rlhf.data.files.files_signature`). ``--max_steps`` and the PPO
    coefficients may change. ``processes`` None: not known yet (before the process group exists; some
    launchers set ``WORLD_SIZE`` only then), left to the check after loading."""
    known = {} if processes is None else {"number of processes": processes}
    return (
        known
        | {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed,
            "num_samples_per_prompt": ppo.num_samples_per_prompt,
            "per_device_mini_train_batch_size": ppo.per_device_mini_train_batch_size,
            "rollout_batches": ppo.rollout_batches,
            "ppo_epochs": ppo.ppo_epochs,
            "pretrain_batch_size": ppo.pretrain_batch_size,
            "advantage_estimator": ppo.advantage_estimator,
            # a saved rollout holds rewards with or without the KL, and the reference log-probs only for the KL
            # loss: resumed with the other setting, it would mix both or lack what the loss reads
            "use_kl_loss": ppo.use_kl_loss,
        }
        | {f"files of {flag}": files_signature(path) for flag, path in inputs.items() if path}
    )


def check_settings_before_loading(resume_from: str | None, known: dict[str, Any]) -> None:
    """Refuse, before any model or data loads, to resume from ``resume_from`` when its
    ``trainer_state.json`` recorded other values of the ``known`` settings (those the flags and input files
    decide): a one-line :class:`CheckpointError`, as the full check after loading gives
    (:func:`rlhf.ppo.checkpoint.check_resume_settings`). Settings only one side has are left to that check."""
    if resume_from is None:
        return
    directory = Path(resume_from)
    saved = read_file(directory / TRAINER_STATE, lambda p: json.loads(p.read_text())).get("settings")
    if saved is not None:
        check_resume_settings(directory, {k: v for k, v in saved.items() if k in known}, known)


def start_afresh(output_dir: Path, backend: Backend) -> None:
    """Remove the ``checkpoint-N`` dirs, ``metrics.jsonl`` and ``eval_samples.jsonl`` of an earlier run (main
    process; all wait)."""
    if backend.is_main:
        old = checkpoint_dirs(output_dir)
        for directory in old:
            shutil.rmtree(directory, ignore_errors=True)
        records = [
            output_dir / name for name in (METRICS_FILE, EVAL_SAMPLES_FILE) if (output_dir / name).exists()
        ]
        if old or records:
            logger.info(
                "removed %d old checkpoint(s)%s from %s",
                len(old), "".join(f" and {path.name}" for path in records), output_dir,
            )  # fmt: skip
        for path in records:
            path.unlink()
    backend.barrier()
