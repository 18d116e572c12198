"""Running a configured ``transformers.Trainer`` the same way in every Trainer-based stage.

train (resuming when asked) -> final save -> evaluate -> ``trainer_state.json`` and ``*_results.json``.
A Ctrl-C or SIGTERM during training saves a ``checkpoint-N`` after the optimizer step in flight and stops
the stage there, without the final save and evaluation (:mod:`rlhf.interruption`). A resume is checked
against the settings its checkpoint recorded (:mod:`rlhf.training.resume_settings`): those of the
``TrainingArguments`` and the stage's ``inputs`` before the model loads, those of the model and data
before training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from rlhf.args import check_output_not_input
from rlhf.interruption import StopSignals, TrainingInterrupted, rerun_resumes
from rlhf.training.checkpoints import TRAINER_STATE
from rlhf.training.outputs import prepare_output_dir, save_final_model
from rlhf.training.resume_settings import (
    args_settings,
    check_resume_settings,
    deepspeed_config,
    inputs_settings,
    trainer_settings,
    zero_stage,
)

logger = logging.getLogger(__name__)


def check_eval_setup(args: TrainingArguments, has_eval_data: bool) -> None:
    """Turn evaluation off (one warning) when there are no held-out rows (``--split_ratio 0``)."""
    if has_eval_data:
        return
    if args.do_eval or args.eval_strategy != IntervalStrategy.NO:
        logger.warning("no evaluation rows (--split_ratio 0 or too little data): evaluation is skipped")
    args.do_eval = False
    args.eval_strategy = IntervalStrategy.NO


def stage_inputs(model_args: Any, data_args: Any) -> dict[str, str | None]:
    """The paths a Trainer stage reads, by flag: the ``inputs`` of :func:`prepare_run` and
    :func:`run_trainer` (a resume must find their files unchanged)."""
    return {
        "--dataset_dir": data_args.dataset_dir,
        "--model_name_or_path": model_args.model_name_or_path,
        "--peft_path": model_args.peft_path,
    }


GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"


def gather_zero3_weights_on_save(args: TrainingArguments) -> None:
    """Under DeepSpeed ZeRO-3, turn ``stage3_gather_16bit_weights_on_model_save`` on (one log line when the
    config had it off), before the engine is built from the config.

    Without it the Trainer cannot gather the partitioned weights when it saves: it writes DeepSpeed's
    ``global_step*/`` shards instead of ``model.safetensors`` (recoverable only with ``zero_to_fp32.py``), one
    warning, and the run ended with exit 0 and a final output dir that plain transformers cannot load.
    Accelerate's ZeRO-3 configs (``zero3_save_16bit_model``) and many hand-written ones leave it off. The
    config dict changed is the one the engine is built from (``--deepspeed``'s or the Accelerate plugin's)."""
    config = deepspeed_config(args)
    if not config or zero_stage(args) != 3:
        return
    zero = config.setdefault("zero_optimization", {})
    was = zero.get(GATHER_ON_SAVE)
    if was is True:
        return
    zero[GATHER_ON_SAVE] = True
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and hasattr(plugin, "zero3_save_16bit_model"):
        plugin.zero3_save_16bit_model = True
    (logger.warning if was is False else logger.info)(
        "DeepSpeed ZeRO-3: %s turned on (the config had it off), so the final model (and each checkpoint's) is "
        "saved as whole weights that plain transformers loads; each save gathers them on the main process",
        GATHER_ON_SAVE,
    )  # fmt: skip


def prepare_run(
    args: TrainingArguments,
    has_eval_data: bool,
    overwrite_output_dir: bool,
    inputs: Mapping[str, str | None] | None = None,
) -> str | None:
    """Settle the arguments every stage needs alike; return the checkpoint to resume from (or None).

    Stage batches carry their own keys (``labels``, ``margin``), so Trainer must not drop "unused" columns.
    ``inputs`` (``{"--dataset_dir": path, ...}``, also passed to :func:`run_trainer`): the paths whose
    files a resume must find unchanged.
    """
    check_output_not_input(args.output_dir, inputs or {})  # before anything in it is deleted or resumed
    check_eval_setup(args, has_eval_data)
    args.remove_unused_columns = False
    gather_zero3_weights_on_save(args)
    return prepare_output_dir(args, overwrite_output_dir, args_settings(args) | inputs_settings(inputs))


class SavedOnSignal(Exception):
    """Raised by :class:`StopOnSignal` out of ``Trainer.train`` once the stop checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(signum, step)
        self.signum, self.step = signum, step


class StopOnSignal(TrainerCallback):
    """After each optimizer step (but the last): when any process received a stop signal, have the Trainer
    save a checkpoint now (``should_save``, and no evaluation, which under ``--save_strategy best`` would
    decide the save), then leave ``train`` from ``on_save`` (:class:`SavedOnSignal`): nothing the Trainer
    does at an epoch's or the run's end (an evaluation, loading the best model, its final deletion of
    checkpoints) runs after the signal. The stop checkpoint is saved like any other, so the
    ``--save_total_limit`` rotation that follows each save (:class:`rlhf.training.outputs.AtomicCheckpointMixin`) runs."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.stopping: tuple[int, int] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # the last step: the run ends and saves anyway
            return control
        signum = self.signals.agreed(args.device)
        if signum:
            control.should_save, control.should_evaluate, control.should_training_stop = True, False, True
            self.stopping = (signum, state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping is not None:
            raise SavedOnSignal(*self.stopping)
        return control


def run_trainer(
    trainer: Trainer,
    resume_from: str | None,
    overwrite_output_dir: bool = False,
    inputs: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """Train, save the final model into ``output_dir``, evaluate; return train and eval metrics.
    ``overwrite_output_dir`` (the stage's flag) only words the message of a run stopped by a signal.
    Checkpoints record the run's settings (``inputs`` as for :func:`prepare_run`); a resume from one saved
    with others stops before training."""
    args = trainer.args
    metrics: dict[str, Any] = {}
    if args.do_train:
        trainer.resume_settings = trainer_settings(trainer, inputs)
        if resume_from is not None:
            check_resume_settings(resume_from, trainer.resume_settings)
        done = last_step_reached(resume_from, args) if resume_from and not deepspeed_config(args) else None
        if done is not None:
            return _finish_from_last_checkpoint(trainer, resume_from, done)
        stop = StopOnSignal(StopSignals())
        try:
            with stop.signals:
                trainer.add_callback(stop)
                result = trainer.train(resume_from_checkpoint=resume_from)
        except SavedOnSignal:
            pass
        if stop.stopping is not None:  # (train returns only if a callback kept the Trainer from saving)
            signum, step = stop.stopping
            trainer.accelerator.wait_for_everyone()
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
            raise TrainingInterrupted(
                signum, step, checkpoint if os.path.isdir(checkpoint) else None,
                rerun_resumes(overwrite_output_dir, args.resume_from_checkpoint),
            )  # fmt: skip
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        save_final_model(trainer, args.output_dir)
    return _final_evaluation(trainer, metrics)


def last_step_reached(checkpoint: str, args: TrainingArguments) -> int | None:
    """The step of ``checkpoint`` when it is the run's last (its ``global_step`` reaches ``--max_steps``, or
    the step count of the same ``--num_train_epochs``), else None.

    A run stopped after its last step but before its final save (a kill during the final save or evaluation)
    left that checkpoint and no finished-run record; resumed from it, the Trainer trained one step past
    ``--max_steps`` (it checks the limit only after a step) and saved another model."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
        step, max_steps = int(state["global_step"]), int(state.get("max_steps") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if args.max_steps > 0:
        return step if step >= args.max_steps else None
    same_epochs = args.num_train_epochs <= float(state.get("num_train_epochs") or 0)
    return step if 0 < max_steps <= step and same_epochs else None


def _finish_from_last_checkpoint(trainer: Trainer, checkpoint: str, step: int) -> dict[str, Any]:
    """Training ended at ``checkpoint`` (:func:`last_step_reached`): its weights and state become the final
    model and ``trainer_state.json``, then the final evaluation runs; nothing is trained."""
    logger.info("%s holds the run's last step (%d): nothing left to train; the final model is saved from it",
                checkpoint, step)  # fmt: skip
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    save_final_model(trainer, trainer.args.output_dir)
    return _final_evaluation(trainer, {})


def _final_evaluation(trainer: Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """Evaluate (``--do_eval``), write ``trainer_state.json`` (the finished-run record) and end."""
    args = trainer.args
    if args.do_eval and trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    # several processes: wait for all, then free the process group (Accelerate's end_training) so no
    # communication thread outlives the interpreter's shutdown; one process: nothing to do
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return metrics
