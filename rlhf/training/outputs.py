"""The output directory of a Trainer-based stage: resume or overwrite, atomic checkpoints, the final save.

- ``--resume_from_checkpoint DIR`` (or ``True`` for the newest ``checkpoint-N`` that loads) continues a
  run; an output dir that already holds checkpoints is resumed from its newest loadable one unless
  ``--overwrite_output_dir`` is given, which deletes the stale ``checkpoint-N`` folders instead (a run
  starting afresh also removes the earlier run's ``trainer_state.json`` and results). Damaged or
  incomplete checkpoints are found before training (:mod:`rlhf.training.checkpoints`): skipped with a
  warning naming the file, or, when named explicitly, a one-line CheckpointError.
- A checkpoint saved with other settings (batch size, processes, seed, adapter, data) than the resuming
  run's is a one-line CheckpointError listing them (:mod:`rlhf.training.resume_settings`); each checkpoint
  records its settings in ``resume_settings.json``.
- A finished run is not trained again: when ``<output_dir>/trainer_state.json`` (written once a run has
  saved its final model) is at or past the step of the newest checkpoint and the command asks for no more
  steps, the implicit resume stops with a one-line CheckpointError (:func:`finished_run_problem`). Resuming
  there would train past ``--max_steps`` or train the steps after an older checkpoint (one a Ctrl-C or
  SIGTERM left under ``--save_strategy no``) again, over the final model.
- Every ``checkpoint-N`` is written to a hidden staging folder and published into place once complete
  (:mod:`rlhf.publish`), so a run killed while saving never leaves a half-written checkpoint that a
  resume would pick up. ``--save_total_limit`` rotation follows each save, a stop checkpoint's included.
- The final model goes to ``--output_dir`` the same way: written to a staging folder, then each file
  renamed over its old version; model files of an earlier save that this one does not write are removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rlhf.args import check_output_dir
from rlhf.checkpoint_dirs import asks_for_newest, list_checkpoints, rotate_checkpoints
from rlhf.errors import CheckpointError, ConfigError
from rlhf.publish import publish_dir, publish_model_files, staging_dir, staging_path
from rlhf.training.checkpoints import (
    TRAINER_STATE,
    WEIGHT_FILES,
    CheckpointLayout,
    checkpoint_problem,
    layout_of,
    newest_loadable_checkpoint,
)
from rlhf.training.resume_settings import check_resume_settings, write_settings

logger = logging.getLogger(__name__)

FINAL_STAGING_NAME = "final"  # the final model is staged in output_dir/.final.tmp


def _resolve_resume(out: Path, resume: str, layout: CheckpointLayout) -> tuple[str, bool]:
    """(the checkpoint ``--resume_from_checkpoint`` names, checked to load; whether it was chosen as the
    newest, by ``True``)."""
    if asks_for_newest(resume):
        checkpoint, skipped = newest_loadable_checkpoint(out, layout)
        if checkpoint is None:
            found = f" ({'; '.join(skipped)})" if skipped else ""
            raise CheckpointError(f"--resume_from_checkpoint True: no loadable checkpoint-N in {out}{found}")
        return str(checkpoint), True
    if not Path(resume).is_dir():
        raise ConfigError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    problem = checkpoint_problem(resume, layout)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {resume}: {problem}")
    return resume, False


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def finished_run_problem(args: TrainingArguments, checkpoint: Path, loads: bool = True) -> str | None:
    """Why the newest ``checkpoint`` of ``args.output_dir`` is not to be resumed because the run there
    already finished (None: resume). A finished run left ``<output_dir>/trainer_state.json`` at step G >=
    the checkpoint's step; it is finished for this command unless the command asks for more: a
    ``--max_steps`` above G, or (``--max_steps`` unset) more ``--num_train_epochs`` than it ran.
    ``loads``: whether ``checkpoint`` could be resumed from (the message then says it is the newest)."""
    out = Path(args.output_dir)
    try:
        final = json.loads((out / TRAINER_STATE).read_text())
        done = int(final["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no finished run (or not one we can read): resume as usual
    step = _step(checkpoint)
    if done < step or done == 0:
        return None  # the checkpoint came after the final save: an unfinished continuation
    if args.max_steps > 0:
        asks_for_more = args.max_steps > done
    else:
        asks_for_more = args.num_train_epochs > float(final.get("num_train_epochs") or 0)
    if asks_for_more:
        if done > step:
            logger.warning(
                "%s already holds a run trained to step %d; its newest checkpoint is %s, so steps %d-%d are "
                "trained again before going on", out, done, checkpoint.name, step + 1, done,
            )  # fmt: skip
        return None
    newest = f" and no newer checkpoint than {checkpoint.name}" if loads else ""
    return (
        f"--output_dir {out} already holds a finished run (trained to step {done}, final model saved){newest}: "
        "pass --overwrite_output_dir to train again, a larger --max_steps or --num_train_epochs to train on"
    )


def prepare_output_dir(
    args: TrainingArguments, overwrite: bool, settings: Mapping[str, Any] | None = None
) -> str | None:
    """Create ``args.output_dir`` and return the checkpoint to resume from (None for a fresh run).

    Damaged or incomplete checkpoints are never resumed from: an explicit ``--resume_from_checkpoint`` to
    one is a CheckpointError naming the file; the implicit resume skips them (one warning each) for the
    newest checkpoint that loads, and is a CheckpointError when none does, or when the run in the output
    dir already finished (:func:`finished_run_problem`). ``settings`` (those known before the model loads,
    :mod:`rlhf.training.resume_settings`) are checked against the checkpoint's.
    """
    check_output_dir(args.output_dir, "--output_dir")
    out = Path(args.output_dir)
    layout = layout_of(args)
    if args.resume_from_checkpoint:
        resume, newest = _resolve_resume(out, str(args.resume_from_checkpoint), layout)
        return _checked(args, resume, newest, settings)
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        return None
    has_checkpoints = bool(list_checkpoints(out))
    if has_checkpoints and not overwrite:
        checkpoint, skipped = newest_loadable_checkpoint(out, layout)
        if checkpoint is None:
            raise CheckpointError(_no_loadable_checkpoint(args, out, skipped))
        resume = _checked(args, str(checkpoint), True, settings)
        logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", checkpoint)
        return resume
    if args.process_index == 0:
        if has_checkpoints:
            for stale in list_checkpoints(out):  # checkpoint-N only: not a user's checkpoint-best/
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("--overwrite_output_dir: removed the old checkpoints in %s", out)
        if args.do_train:
            forget_finished_run(out)
    return None


# What the Trainer writes into the output dir about a run that finished there (beside its final model).
RUN_RECORDS = (TRAINER_STATE, "all_results.json", "train_results.json", "eval_results.json")


def forget_finished_run(out: Path) -> None:
    """A run starting afresh in ``out`` removes the records of the run that finished there before: left in
    place, they would make a checkpoint of this run (killed before its final save) look older than a
    finished run (:func:`finished_run_problem`), and its resume refused. The earlier final model stays until
    this run's final save replaces it."""
    found = [name for name in RUN_RECORDS if (out / name).is_file()]
    for name in found:
        (out / name).unlink()
    if found:
        logger.info(
            "starting afresh in %s: removed the earlier run's %s (its final model stays until this run saves)",
            out, ", ".join(found),
        )  # fmt: skip


def _no_loadable_checkpoint(args: TrainingArguments, out: Path, skipped: list[str]) -> str:
    """The one line for an output dir with checkpoints of which none loads: a finished run, checkpoints
    saved with ``--save_only_model`` (which hold no optimizer state), or damaged ones."""
    finished = finished_run_problem(args, list_checkpoints(out)[0], loads=False) if args.do_train else None
    if finished is not None:
        return finished
    if args.save_only_model and skipped and all("optimizer.pt" in reason for reason in skipped):
        return (
            f"--output_dir {out}: its checkpoints were saved with --save_only_model (weights, no optimizer "
            "or scheduler state) and cannot be resumed: pass --overwrite_output_dir to start afresh, or train "
            "on from a checkpoint's weights with --peft_path (LoRA) or --model_name_or_path (full "
            "fine-tuning) and another --output_dir"
        )
    return f"--output_dir {out}: no checkpoint-N loads ({'; '.join(skipped)}); pass --overwrite_output_dir to start afresh"


def _checked(args: TrainingArguments, resume: str, newest: bool, settings: Mapping[str, Any] | None) -> str:
    """``resume``, unless the run finished there (only when it was picked as the newest checkpoint: a
    named one is resumed as asked) or was saved with other ``settings``."""
    if newest and args.do_train:
        problem = finished_run_problem(args, Path(resume))
        if problem is not None:
            if args.resume_from_checkpoint:  # True: with it, --overwrite_output_dir alone would be ignored
                problem = problem.replace(
                    "pass --overwrite_output_dir",
                    "drop --resume_from_checkpoint True, pass --overwrite_output_dir",
                )
            raise CheckpointError(problem)
    if settings:
        check_resume_settings(resume, settings, warn_unrecorded=False)
    return resume


@contextmanager
def _cache_on(model: Any):
    """``config.use_cache`` on while the final model is saved: Trainer turns it off for training
    (``--use_cache`` defaults to off), but a saved model's users want their forwards to cache."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before is None:
        yield
        return
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = before


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
    with _cache_on(trainer.model):
        trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    # the writing process(es) look (other nodes may not see a node-local output dir); one that raises ends the
    # launch (torchrun stops the other processes)
    if trainer.args.should_save and not any((staging / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"the final save wrote no weights into {staging} (a DeepSpeed ZeRO-3 config that does not gather "
            "them on save?); the checkpoints in the output dir are kept"
        )
    trainer.accelerator.wait_for_everyone()  # all have looked before the staging dir is published away
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
    :mod:`rlhf.publish`), which is then published as ``output_dir/checkpoint-N``, with
    :attr:`resume_settings` (when set: :func:`rlhf.training.runner.run_trainer` sets them) recorded in it.
    Then checkpoints beyond ``--save_total_limit`` are deleted (the oldest first, never the best one).
    """

    _staging_dir: str | None = None
    resume_settings: Mapping[str, Any] | None = None

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
        best = self.state.best_model_checkpoint
        if best and best.startswith(staging):  # the Trainer named the staged dir: the published one it is
            self.state.best_model_checkpoint = run_dir + best[len(staging) :]
        if self.args.should_save:
            if self.resume_settings is not None:
                write_settings(Path(staging) / name, self.resume_settings)
            if best != self.state.best_model_checkpoint:  # and in the state it saved, which a resume reads
                self.state.save_to_json(str(Path(staging) / name / TRAINER_STATE))
            publish_dir(Path(staging) / name, target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, target, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
