"""The output directory of a Trainer-based stage: resume or overwrite, atomic checkpoints, the final save.

- ``--resume_from_checkpoint DIR`` (or ``True`` for the newest ``checkpoint-N``) continues a run; an
  output dir that already holds checkpoints is resumed from its newest one unless
  ``--overwrite_output_dir`` is given, which deletes the stale ``checkpoint-N`` folders instead.
- Every ``checkpoint-N`` is written to a hidden staging folder and renamed into place once complete, so
  a run killed while saving never leaves a half-written checkpoint that a resume would pick up.
- The final model goes to ``--output_dir`` the same way: written to a staging folder, then each file
  renamed over its old version.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

STAGING = ".staging"


def prepare_output_dir(args: TrainingArguments, overwrite: bool) -> str | None:
    """Create ``args.output_dir`` and return the checkpoint to resume from (None for a fresh run)."""
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume and resume.lower() in ("true", "1", "yes"):
        resume = get_last_checkpoint(out) if out.is_dir() else None
        if resume is None:
            raise ConfigError(f"--resume_from_checkpoint True: no checkpoint-N folder in {out}")
    if resume:
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
        return str(resume)
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        return None
    last = get_last_checkpoint(out)
    if last is not None and not overwrite:
        logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", last)
        return last
    if last is not None and args.process_index == 0:
        for stale in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("--overwrite_output_dir: removed the old checkpoints in %s", out)
    return None


def _move_into(staging: Path, target: Path) -> None:
    """Rename every entry of ``staging`` into ``target`` (replacing same-named ones), then drop staging."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        dest = target / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    shutil.rmtree(staging, ignore_errors=True)


def save_final_model(trainer: Trainer, output_dir: str) -> None:
    """Save the model (adapter or full weights) and tokenizer into ``output_dir`` atomically per file.

    Must run on every process (DeepSpeed ZeRO-3 gathers the weights collectively).
    """
    staging = Path(output_dir) / f"{STAGING}-final"
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        (staging / "training_args.bin").unlink(missing_ok=True)
        _move_into(staging, Path(output_dir))
        logger.info("saved the final model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()


class AtomicCheckpointMixin:
    """A ``transformers.Trainer`` mixin: each ``checkpoint-N`` appears in ``output_dir`` only when complete."""

    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING)
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            target = Path(run_dir) / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = run_dir + best[len(staging) :]
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
