"""One logging format for every entry point: ``time level name: message``; rank 0 logs from INFO up, the
other ranks errors only (every rank reads the same data and flags: their warnings were rank 0's, repeated
once per process, 8 times on 8 GPUs), and the stop signal a rank received."""

from __future__ import annotations

import logging
import os
import warnings

# Library-to-library deprecation noise a user cannot act on: peft reads transformers' deprecated
# ``is_gradient_checkpointing`` property while wrapping every model (transformers 5.x, peft 0.21).
QUIET_WARNINGS = ((FutureWarning, r".*`is_gradient_checkpointing` is deprecated.*"),)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger; non-zero ranks log errors only."""
    rank = int(os.environ.get("RANK", "0"))
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.basicConfig(
        level=level if rank == 0 else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if rank != 0:
        # what only this rank knows: the stop signal it received (rlhf/interruption.py)
        logging.getLogger("rlhf.interruption").setLevel(logging.WARNING)
        # transformers and datasets log through their own loggers and bars: quiet those too
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
