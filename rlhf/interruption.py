"""Stopping a training run on Ctrl-C or SIGTERM without losing its progress.

The first SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler's preemption) that a training loop
receives asks it to stop: the loop finishes the optimizer step in flight, every process agrees on the step
(one all-reduce of the signal number per optimizer step when there are several processes), a
``checkpoint-N`` is saved exactly as at a ``--save_steps`` step, and the command exits with 128 + the signal
number (130 after Ctrl-C, 143 after SIGTERM) and one line naming the checkpoint. Running the same command
again resumes from it (with ``--overwrite_output_dir`` or a named ``--resume_from_checkpoint``, the line
says to pass ``--resume_from_checkpoint`` with the new checkpoint instead). A second Ctrl-C acts as it
normally does (``KeyboardInterrupt`` at once, no checkpoint), so a stuck run can still be stopped; further
SIGTERMs are ignored, since a scheduler and torchrun may each send one.

A grace period before SIGKILL has to cover the rest of one optimizer step and the checkpoint write: a
scheduler's, or torchrun's, which forwards SIGINT/SIGTERM to its workers (each in a session of its own)
and kills them ``--shutdown_timeout`` seconds later (30 by default).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType

import torch
import torch.distributed as dist

from rlhf.checkpoint_dirs import asks_for_newest

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_accelerate_simple_launcher() -> bool:
    """``accelerate launch`` with one process runs the script as a plain child (``ACCELERATE_*`` set, no
    torchrun elastic agent) and does not forward signals to it."""
    return "ACCELERATE_USE_CPU" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ


def stop_when_the_launcher_dies() -> None:
    """Ask Linux for a SIGTERM when the parent process dies (``PR_SET_PDEATHSIG``), under ``accelerate
    launch``'s one-process launcher only: a SIGTERM sent to the launcher (``kill``, a scheduler) ends it at
    once, and its child would otherwise go on training as an orphan (then a re-run would make two writers
    of one output dir); with this, the child saves a checkpoint and stops as on its own SIGTERM."""
    if not sys.platform.startswith("linux") or not under_accelerate_simple_launcher():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the launcher's signals stay the launcher's
        return


def is_first_process() -> bool:
    """Rank 0 of a launched job (``RANK`` from torchrun / Accelerate), or a single process: the one that
    prints the stop lines, so a job of N processes says them once."""
    return os.environ.get("RANK", "0") == "0"


def rerun_resumes(overwrite_output_dir: bool, resume_from_checkpoint: str | None) -> bool:
    """Whether running the same command again resumes from the newest checkpoint: not when it starts afresh
    (``--overwrite_output_dir``) or names a checkpoint (``--resume_from_checkpoint DIR``)."""
    named = bool(resume_from_checkpoint) and not asks_for_newest(resume_from_checkpoint)
    return not overwrite_output_dir and not named


class TrainingInterrupted(Exception):
    """A run stopped on a signal after saving ``checkpoint``; the entry point exits with :attr:`exit_code`.

    ``same_command_resumes``: see :func:`rerun_resumes` (the message says how to resume)."""

    def __init__(
        self, signum: int, step: int, checkpoint: str | None, same_command_resumes: bool = True
    ) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        message = f"stopped by {signal.Signals(signum).name} after optimizer step {step}; "
        if checkpoint is None:
            message += "no checkpoint was saved."
        elif same_command_resumes:
            message += f"checkpoint saved to {checkpoint}. Run the same command again to resume from it."
        else:
            message += (
                f"checkpoint saved to {checkpoint}. To resume from it, run the command with "
                f"--resume_from_checkpoint {checkpoint}."
            )
        super().__init__(message)

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
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            stop_when_the_launcher_dies()
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker, which inherited the handler: not its call
            return
        if self.received is not None:  # a repeated SIGTERM (a scheduler's and torchrun's): already stopping
            return
        self.received = signum
        previous = self._previous.pop(signal.SIGINT, None)
        if previous is not None:  # a second Ctrl-C acts as usual
            signal.signal(signal.SIGINT, previous)
        logger.warning(  # by each process that got it (one signalled rank of several says so itself)
            "%s received: finishing the current optimizer step, then saving a checkpoint and stopping "
            "(Ctrl-C again stops at once, without a checkpoint)", signal.Signals(signum).name,
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
