"""The non-finite loss guard of the Trainer-based stages (SFT, reward model), like PPO's.

``transformers.Trainer`` quietly drops NaN/inf losses from its logs (``logging_nan_inf_filter``) and keeps
stepping, so one bad batch can turn every weight into NaN and the run still "finishes" and saves them.
:class:`FiniteLossMixin` checks each micro-batch loss right after its backward pass, before the optimizer
applies anything: a non-finite loss (on any process) stops the run with a :class:`NonFiniteLossError`
naming the step and the newest checkpoint that still loads. The final model is then not saved, so an
earlier final model in ``--output_dir`` stays as it was.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from rlhf.errors import UserError
from rlhf.training.checkpoints import newest_loadable_checkpoint


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


def non_finite_loss_message(loss: float, step: int, output_dir: str | Path) -> str:
    """The one-line explanation for a non-finite ``loss`` at optimizer step ``step`` (1-based)."""
    checkpoint, _ = newest_loadable_checkpoint(output_dir)
    kept = str(checkpoint) if checkpoint is not None else "none (no checkpoint saved yet)"
    where = f"{loss}" if not math.isfinite(loss) else "on another process"
    return (
        f"non-finite training loss ({where}) at step {step}; stopped before its update and did not save "
        f"the final model. Last good checkpoint: {kept}"
    )


class FiniteLossMixin:
    """A ``transformers.Trainer`` mixin: stop at the first non-finite training loss (all processes agree)."""

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            step = self.state.global_step + 1
            self._close_progress_bar()
            raise NonFiniteLossError(non_finite_loss_message(float(loss), step, self.args.output_dir))
        return loss

    def _close_progress_bar(self) -> None:
        """End the tqdm bar's line, so the error starts on a line of its own."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
                callback.training_bar = None
