"""Training metrics of the loops that are not a ``transformers.Trainer``: a logging window and ``metrics.jsonl``.

- :class:`MetricsWindow` collects values under namespaced keys between two logging steps and reports each
  key's mean (the PPO loop's :class:`rlhf.ppo.metrics.MetricsAccumulator` adds rollout statistics to it;
  the TP supervised stages use it as it is);
- :class:`MetricsFile` is ``metrics.jsonl``: one JSON object per logging step, non-finite values written
  as ``null``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from rlhf.publish import write_text_atomic

logger = logging.getLogger(__name__)


class MetricsWindow:
    """Values added since the last log, by key; :meth:`means` averages each key, :meth:`reset` starts over."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.values[key].append(float(value))

    def means(self) -> dict[str, float]:
        """The mean of every key with a value, in the order the keys were first added."""
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}

    def reset(self) -> None:
        self.values.clear()


class MetricsFile:
    """``metrics.jsonl``: one JSON object per logging step. On resume, lines after the checkpoint's step
    are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps <= ``step``. A row that does not parse (the run was killed while writing
        it, which also means its step's checkpoint was never published) is dropped with a warning."""
        if not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                logger.warning(
                    "%s:%d: not a whole metrics row (a write cut short); dropped", self.path, number
                )
                continue
            if row_step <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def append(self, metrics: dict[str, float]) -> None:
        self.append_rows([metrics])

    def append_rows(self, rows: list[dict]) -> None:
        """Append rows (each with a ``step``); values are numbers, or strings and booleans (a sample's text)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {
                    k: v if v is None or isinstance(v, (int, str)) or math.isfinite(v) else None
                    for k, v in row.items()
                }
            )
            for row in rows
        ]
        with self.path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
