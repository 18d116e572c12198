"""User-facing errors and the CLI guard that turns them into one line and a non-zero exit.

Anything the user can fix (a malformed data row, a bad flag, a checkpoint of the wrong family) raises a
``UserError`` subclass. Entry points wrap ``main`` with :func:`exit_on_user_error`, so the user sees
``error: rm_data/pairs.jsonl:2: missing field "rejected"`` instead of a traceback wall.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from rlhf.interruption import TrainingInterrupted, is_first_process

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An error caused by input the user controls; its message is shown as is."""


class DataError(UserError):
    """Malformed or missing training data. The message starts with ``file:line:`` when a row is to blame."""


class ConfigError(UserError):
    """A bad flag value or a combination of flags that cannot work together."""


class CheckpointError(UserError):
    """A model or adapter directory that is missing, incomplete or of the wrong family."""


def find_user_error(exc: BaseException) -> UserError | None:
    """Return the UserError behind ``exc`` (libraries such as ``datasets`` wrap exceptions), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate an entry point: a UserError (also when wrapped) prints ``error: <message>`` and exits 2; a
    run stopped by a signal after its checkpoint (:class:`rlhf.interruption.TrainingInterrupted`) prints
    where the checkpoint is and exits with 128 + the signal number."""

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TrainingInterrupted as stopped:
            if is_first_process():  # every process stops the same way: one line for the job
                print(str(stopped), file=sys.stderr, flush=True)
            sys.exit(stopped.exit_code)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is the user's error
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return guarded
