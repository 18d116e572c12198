"""Metrics: per-step accumulation, averaging over processes, and the ``metrics.jsonl`` file."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


class MetricsAccumulator:
    """Collects values under namespaced keys between two logging steps; ``means()`` averages each key."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.values[key].append(float(value))

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}

    def reset(self) -> None:
        self.values.clear()

    def state(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.values.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.values = defaultdict(list, {k: list(v) for k, v in state.items()})


class MetricsFile:
    """``metrics.jsonl``: one JSON object per logging step. On resume, lines after the checkpoint's step
    are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path) -> None:
        self.path = path

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
