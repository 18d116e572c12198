"""PPO metrics: the step window of :mod:`rlhf.metrics` plus per-rollout statistics (``metrics.jsonl`` is
:class:`rlhf.metrics.MetricsFile`, importable from here too)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rlhf.metrics import MetricsFile, MetricsWindow

__all__ = ["MetricsAccumulator", "MetricsFile"]

ROLLOUT_TIME = "time/rollout_s"


class MetricsAccumulator(MetricsWindow):
    """Collects values under namespaced keys between two logging steps; ``means()`` averages each key.

    Two kinds of values:

    - step values (losses, clip fractions, grad norms, times) added with :meth:`add` or
      :meth:`add_mini_batch`: a row reports the mean of the entries since the last log;
    - rollout statistics (``reward/score``, ``objective/kl``, ...), given once per rollout to
      :meth:`start_rollout`. Every mini-batch trained on that rollout (:meth:`add_mini_batch`) counts it
      once, and a row reports the mean over its mini-batches of the statistics of the rollout each one
      trained on. So every row has the rollout keys, whether or not a rollout was collected in its window,
      and all rows whose steps trained on one rollout report exactly its values.

    A rollout's seconds are spread evenly over its mini-batches: each one adds
    ``seconds / mini_batches`` to ``time/rollout_s``, so summed over a window and divided by its optimizer
    steps (:func:`rlhf.ppo.loop.write_log`) it is the rollout time per optimizer step, without a spike
    at the step that happened to collect the rollout.
    """

    def __init__(self) -> None:
        super().__init__()
        # The rollouts trained on since the last log, the current one last: each is
        # {"stats": {key: value}, "seconds_per_mini_batch": s, "mini_batches": count in this window}.
        self.rollouts: list[dict[str, Any]] = []

    def start_rollout(self, stats: dict[str, float], seconds: float, mini_batches: int) -> None:
        """A new rollout: its statistics, the seconds collecting it took, and the mini-batches it holds."""
        self.rollouts.append(
            {
                "stats": {k: float(v) for k, v in stats.items()},
                "seconds_per_mini_batch": seconds / max(mini_batches, 1),
                "mini_batches": 0,
            }
        )

    def add_mini_batch(self, metrics: dict[str, float]) -> None:
        """One mini-batch's values, trained on the current rollout (whose statistics it then counts)."""
        self.add(metrics)
        if self.rollouts:
            current = self.rollouts[-1]
            current["mini_batches"] += 1
            self.values[ROLLOUT_TIME].append(current["seconds_per_mini_batch"])

    def means(self) -> dict[str, float]:
        """Mean of every step value, and the mini-batch-weighted mean of the rollout statistics."""
        means = super().means()
        trained = [r for r in self.rollouts if r["mini_batches"] > 0]
        keys = dict.fromkeys(key for r in trained for key in r["stats"])  # in order of first appearance
        for key in keys:
            # over the rollouts that have the key (a resumed run may collect others than its checkpoint's);
            # weights first, so one rollout's values come back bit for bit (1.0 · x = x)
            having = [r for r in trained if key in r["stats"]]
            total = sum(r["mini_batches"] for r in having)
            means[key] = sum((r["mini_batches"] / total) * r["stats"][key] for r in having)
        return means

    def reset(self) -> None:
        """Start a new logging window; the current rollout stays, for the mini-batches still to train."""
        self.values.clear()
        self.rollouts = [dict(self.rollouts[-1], mini_batches=0)] if self.rollouts else []

    def state(self) -> dict[str, Any]:
        """JSON-able state: a checkpoint inside a rollout resumes with its statistics."""
        rollouts = [dict(r, stats=dict(r["stats"])) for r in self.rollouts]
        return {"values": {k: list(v) for k, v in self.values.items()}, "rollouts": rollouts}

    def load_state(self, state: dict[str, Any]) -> None:
        if "rollouts" not in state:  # checkpoints written before rollout statistics were kept
            state = {"values": state, "rollouts": []}
        self.values = defaultdict(list, {k: list(v) for k, v in state["values"].items()})
        self.rollouts = [dict(r, stats=dict(r["stats"])) for r in state["rollouts"]]
