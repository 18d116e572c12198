"""The output directory of a Trainer-based stage: resume or overwrite, atomic checkpoints, the final save.

- ``--resume_from_checkpoint DIR`` (or ``True`` for the newest ``checkpoint-N`` that loads) continues a
  run; an output dir that already holds checkpoints is resumed from its newest loadable one unless
  ``--overwrite_output_dir`` is given, which deletes the stale ``checkpoint-N`` folders instead. Damaged
  checkpoints are found before training (:mod:`rlhf.training.checkpoints`): skipped with a warning naming
  the file, or, when named explicitly, a one-line CheckpointError.
- Every ``checkpoint-N`` is written to a hidden staging folder and published into place once complete
  (:mod:`rlhf.publish`), so a run killed while saving never leaves a half-written checkpoint that a
  resume would pick up.
- The final model goes to ``--output_dir`` the same way: written to a staging folder, then each file
  renamed over its old version; model files of an earlier save that this one does not write are removed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from rlhf.args import check_output_dir
from rlhf.checkpoint_dirs import asks_for_newest, list_checkpoints
from rlhf.errors import CheckpointError, ConfigError
from rlhf.publish import publish_dir, publish_model_files, staging_dir, staging_path
from rlhf.training.checkpoints import checkpoint_problem, newest_loadable_checkpoint

logger = logging.getLogger(__name__)

FINAL_STAGING_NAME = "final"  # the final model is staged in output_dir/.final.tmp


def _resolve_resume(out: Path, resume: str) -> str:
    """The checkpoint ``--resume_from_checkpoint`` names, checked to load (``True``: newest that loads)."""
    if asks_for_newest(resume):
        checkpoint, skipped = newest_loadable_checkpoint(out)
        if checkpoint is None:
            found = f" ({'; '.join(skipped)})" if skipped else ""
            raise CheckpointError(f"--resume_from_checkpoint True: no loadable checkpoint-N in {out}{found}")
        return str(checkpoint)
    if not Path(resume).is_dir():
        raise ConfigError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {resume}: {problem}")
    return resume


def prepare_output_dir(args: TrainingArguments, overwrite: bool) -> str | None:
    """Create ``args.output_dir`` and return the checkpoint to resume from (None for a fresh run).

    Damaged checkpoints are never resumed from: an explicit ``--resume_from_checkpoint`` to one is a
    CheckpointError naming the file; the implicit resume skips them (one warning each) for the newest
    checkpoint that loads, and is a CheckpointError when none does.
    """
    check_output_dir(args.output_dir, "--output_dir")
    out = Path(args.output_dir)
    if args.resume_from_checkpoint:
        return _resolve_resume(out, str(args.resume_from_checkpoint))
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        return None
    has_checkpoints = bool(list_checkpoints(out))
    if has_checkpoints and not overwrite:
        checkpoint, skipped = newest_loadable_checkpoint(out)
        if checkpoint is None:
            raise CheckpointError(
                f"--output_dir {out}: no checkpoint-N loads ({'; '.join(skipped)}); "
                "pass --overwrite_output_dir to start afresh"
            )
        logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", checkpoint)
        return str(checkpoint)
    if has_checkpoints and args.process_index == 0:
        for stale in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("--overwrite_output_dir: removed the old checkpoints in %s", out)
    return None


def save_final_model(trainer: Trainer, output_dir: str) -> None:
    """Save the model (adapter or full weights) and tokenizer into ``output_dir`` atomically per file.

    The model files of an earlier save that this one does not write are removed (one log line names
    them), so the directory loads as this model and no other. Must run on every process (DeepSpeed
    ZeRO-3 gathers the weights collectively).
    """
    final = Path(output_dir) / FINAL_STAGING_NAME
    if trainer.args.should_save:
        staging_dir(final)
    trainer.accelerator.wait_for_everyone()
    staging = staging_path(final)
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        (staging / "training_args.bin").unlink(missing_ok=True)
        stale = publish_model_files(staging, Path(output_dir))
        if stale:
            logger.info("removed the earlier model's %s from %s", ", ".join(stale), output_dir)
        logger.info("saved the final model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()


class AtomicCheckpointMixin:
    """A ``transformers.Trainer`` mixin: each ``checkpoint-N`` appears in ``output_dir`` only when complete.

    The Trainer writes ``checkpoint-N`` inside the hidden staging folder ``.checkpoint-N.tmp`` (see
    :mod:`rlhf.publish`), which is then published as ``output_dir/checkpoint-N``.
    """

    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        target = Path(run_dir) / name
        if self.args.should_save:
            staging_dir(target)
        self.accelerator.wait_for_everyone()
        staging = str(staging_path(target))
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_dir(Path(staging) / name, target)
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
