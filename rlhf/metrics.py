"""Training metrics of the loops that are not a ``transformers.Trainer``: a logging window and ``metrics.jsonl``.

- :class:`MetricsWindow` collects values under namespaced keys between two logging steps and reports each
  key's mean (the PPO loop's :class:`rlhf.ppo.metrics.MetricsAccumulator` adds rollout statistics to it;
  the TP supervised stages use it as it is);
- :class:`MetricsFile` is ``metrics.jsonl``: one JSON object per logging step, non-finite values written
  as ``null``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


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
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, metrics: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
