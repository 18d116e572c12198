"""Run an entry script as ``__main__`` (``python gloo_threads_after.py SCRIPT ARGS...``, under torchrun), then
print how many of torch's gloo communication threads the process still runs.

A run that freed its process group leaves none. One that leaves some has a live group that the interpreter's
exit tears down later, which now and then aborted a finished run (see
:func:`rlhf.args.import_deepspeed_before_process_group`).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def gloo_threads() -> int:
    tasks = Path("/proc/self/task")
    return sum("gloo" in (task / "comm").read_text() for task in tasks.iterdir())


if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    print(f"rank {os.environ.get('RANK')}: {gloo_threads()} gloo thread(s) left", file=sys.stderr, flush=True)
