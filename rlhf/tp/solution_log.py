"""The solutions ``solver_evaluate`` has generated so far, kept across an interrupted run.

Generation goes batch by batch; after each one rank 0 appends its solutions to a hidden file in
``--log_dir`` (``.solutions-<pass>.partial.jsonl``: a first line with the settings that decide the
solutions, then one ``{"index", "output"}`` line per solution). Re-running the same command (same
settings) reads them back and generates only the batches that are missing; every batch samples from a
generator seeded with ``--seed`` and the batch's number, so its solutions do not depend on which batches
ran before it in this process. A torn last line (a kill while writing) is ignored; a file written with
other settings is set aside with a warning and the generation starts afresh. The file is removed once
``predictions.jsonl`` is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlhf.publish import write_text_atomic

logger = logging.getLogger(__name__)


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` of a run seeded with ``seed`` (independent streams per batch)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SolutionLog:
    """``path``: the partial file; ``settings``: what decides the solutions (JSON-able)."""

    def __init__(self, path: Path, settings: dict[str, Any], main: bool) -> None:
        self.path, self.settings, self.main = Path(path), settings, main

    def load(self) -> dict[int, str]:
        """The solutions a run with the same settings left, by index (empty when none); the same on every
        rank (rank 0 reads the file and broadcasts it)."""
        done = self._read() if self.main else {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            holder = [done]
            dist.broadcast_object_list(holder, src=0)
            done = holder[0]
        return done

    def _read(self) -> dict[int, str]:
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != {"settings": self.settings}:
            logger.warning("%s was written with other settings: generating every solution afresh", self.path)
            self.path.unlink()
            return {}
        done: dict[int, str] = {}
        for kept, line in enumerate(lines[1:], start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short: drop it and what follows
                write_text_atomic(self.path, "".join(x + "\n" for x in lines[:kept]))
                break
            done[int(row["index"])] = row["output"]
        logger.info("%s: %d solutions from an earlier run of this command, kept", self.path, len(done))
        return done

    def append(self, outputs: dict[int, str]) -> None:
        """Record a finished batch's solutions (rank 0 writes; the others do nothing)."""
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"settings": self.settings}) + "\n")
            for index, output in outputs.items():
                f.write(json.dumps({"index": index, "output": output}, ensure_ascii=False) + "\n")
            f.flush()

    def remove(self) -> None:
        if self.main:
            self.path.unlink(missing_ok=True)


def seeded(generator: torch.Generator, seed: int, batch: int) -> torch.Generator:
    """``generator`` re-seeded for batch ``batch``."""
    return generator.manual_seed(batch_seed(seed, batch))
