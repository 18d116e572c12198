"""Stopping a training run on Ctrl-C or SIGTERM without losing its progress.

The first SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler's preemption) that a training loop
receives asks it to stop: the loop finishes the optimizer step in flight, every process agrees on the step
(one all-reduce of the signal number per optimizer step when there are several processes), a
``checkpoint-N`` is saved exactly as at a ``--save_steps`` step, and the command exits with 128 + the signal
number (130 after Ctrl-C, 143 after SIGTERM) and one line naming the checkpoint. Running the same command
again resumes from it. A second signal acts as it normally does (Ctrl-C then raises ``KeyboardInterrupt`` at
once), so a stuck run can still be killed.

A grace period before SIGKILL has to cover the rest of one optimizer step and the checkpoint write: a
scheduler's, or torchrun's, which forwards SIGINT/SIGTERM to its workers (each in a session of its own)
and kills them ``--shutdown_timeout`` seconds later (30 by default).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """A run stopped on a signal after saving ``checkpoint``; the entry point exits with :attr:`exit_code`."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after optimizer step {step}; {where}. Run the same "
            "command again to resume from it."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered, the first SIGINT/SIGTERM is recorded in :attr:`received` instead of acting.

    Handlers can only be installed from the main thread; elsewhere (a training loop run from a worker
    thread) the signals keep their usual behaviour and :attr:`received` stays None.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._restore()  # a second signal acts as usual
        logger.warning(
            "%s received: finishing the current optimizer step, then saving a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint)", signal.Signals(signum).name,
        )  # fmt: skip

    def agreed(self, device: torch.device) -> int:
        """The signal number any process received (0: none), the same on every process; call it at the
        same point of the loop on every process (a collective when there are several)."""
        value = self.received or 0
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return value
        flag = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
