"""Experiment trackers (``--report_to``: wandb, tensorboard, ...), on the main process only.

Both backends use this one class, so ``--report_to`` means the same under Accelerate and under tensor
parallelism: the named trackers are Accelerate's tracker classes (``accelerate.tracking``), started on
the main process with the project name and the run's flags as configuration; wandb writes into the
output dir (``<output_dir>/wandb``), tensorboard into ``<output_dir>/<project>``. A tracker that fails
to start is dropped with one warning line: ``metrics.jsonl`` is written regardless.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

KNOWN_TRACKERS = ("wandb", "tensorboard", "comet_ml", "mlflow", "aim", "clearml", "dvclive")


def tracker_names(report_to: list[str]) -> list[str]:
    """``--report_to`` values -> tracker names (``none`` dropped, ``all`` = wandb + tensorboard); unknown
    names are dropped with a warning."""
    wanted = [t for t in report_to if t not in ("none", "")]
    if "all" in wanted:
        wanted = ["wandb", "tensorboard"]
    unknown = [t for t in wanted if t not in KNOWN_TRACKERS]
    if unknown:
        logger.warning("--report_to: unknown tracker(s) %s ignored", ",".join(unknown))
    return [t for t in wanted if t in KNOWN_TRACKERS]


class Trackers:
    """The trackers named by ``report_to``, active only when ``is_main``; ``project_dir`` holds their
    local files (see the module docstring)."""

    def __init__(self, report_to: list[str], project_dir: str | None, is_main: bool) -> None:
        self.names = tracker_names(report_to) if is_main else []
        self.project_dir = project_dir
        self._running: list[Any] = []

    def start(self, project: str, config: dict[str, Any]) -> None:
        """Start every tracker and store ``config`` as the run's hyperparameters."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in self.names:
            try:
                cls = LOGGER_TYPE_TO_CLASS[name]
                if cls.requires_logging_directory:
                    if not self.project_dir:
                        raise ValueError("it needs an output dir")
                    tracker = cls(project, self.project_dir)
                elif name == "wandb" and self.project_dir:
                    tracker = cls(project, dir=self.project_dir)
                else:
                    tracker = cls(project)
                tracker.main_process_only = False  # we run it on the main process only ourselves
                tracker.start()
                tracker.store_init_configuration(config)
                self._running.append(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker failing must not stop training
                logger.warning("tracker %s not started (%s); metrics.jsonl is still written", name, exc)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self._running:
            tracker.log(metrics, step=step)

    def end(self) -> None:
        for tracker in self._running:
            tracker.finish()
        self._running = []


class TrackerMethods:
    """``init_trackers`` and ``log`` of :class:`rlhf.backend.Backend` for a backend that holds its
    :class:`Trackers` as ``self.trackers`` (both backends do; each ends them in its own ``end``)."""

    trackers: Trackers

    def init_trackers(self, project: str, config: dict[str, Any]) -> None:
        self.trackers.start(project, config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackers.log(metrics, step)
