"""Running a configured ``transformers.Trainer`` the same way in every Trainer-based stage.

train (resuming when asked) -> final save -> evaluate -> ``trainer_state.json`` and ``*_results.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from rlhf.training.outputs import prepare_output_dir, save_final_model

logger = logging.getLogger(__name__)


def check_eval_setup(args: TrainingArguments, has_eval_data: bool) -> None:
    """Turn evaluation off (one warning) when there are no held-out rows (``--split_ratio 0``)."""
    if has_eval_data:
        return
    if args.do_eval or args.eval_strategy != IntervalStrategy.NO:
        logger.warning("no evaluation rows (--split_ratio 0 or too little data): evaluation is skipped")
    args.do_eval = False
    args.eval_strategy = IntervalStrategy.NO


def prepare_run(args: TrainingArguments, has_eval_data: bool, overwrite_output_dir: bool) -> str | None:
    """Settle the arguments every stage needs alike; return the checkpoint to resume from (or None).

    Stage batches carry their own keys (``labels``, ``margin``), so Trainer must not drop "unused" columns.
    """
    check_eval_setup(args, has_eval_data)
    args.remove_unused_columns = False
    return prepare_output_dir(args, overwrite_output_dir)


def run_trainer(trainer: Trainer, resume_from: str | None) -> dict[str, Any]:
    """Train, save the final model into ``output_dir``, evaluate; return train and eval metrics."""
    args = trainer.args
    metrics: dict[str, Any] = {}
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        save_final_model(trainer, args.output_dir)
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
