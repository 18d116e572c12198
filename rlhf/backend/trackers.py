"""Experiment trackers (``--report_to``: wandb, tensorboard, ...), on the main process only.

Both backends use this one class, so ``--report_to`` means the same under Accelerate and under tensor
parallelism: the trackers start on the main process with the project name and the run's flags as their
configuration; wandb writes into the output dir (``<output_dir>/wandb``), tensorboard into
``<output_dir>/<project>``. A tracker that fails to start is dropped with one warning line:
``metrics.jsonl`` is written regardless.

wandb and tensorboard are driven directly (they need no Accelerate process state, which a
tensor-parallel job does not create); the other names Accelerate knows (comet_ml, mlflow, aim, clearml,
dvclive) go through ``accelerate.tracking``, which needs that state: they work under ``run_ppo_with_peft.py``.
"""

from __future__ import annotations

import json
import logging
import os
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


class WandbRun:
    """A wandb run in ``project_dir`` (``WANDB_MODE=offline`` keeps it local)."""

    def __init__(self, project: str, project_dir: str | None, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=project, dir=project_dir, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class TensorBoardRun:
    """A tensorboard event file in ``project_dir/project``, the flags as hyperparameters."""

    def __init__(self, project: str, project_dir: str | None, config: dict[str, Any]) -> None:
        if not project_dir:
            raise ValueError("it needs an output dir")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(project_dir, project))
        plain = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}
        self.writer.add_hparams(plain, metric_dict={})

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class AccelerateRun:
    """Any other tracker of ``accelerate.tracking`` (needs Accelerate's process state)."""

    def __init__(self, name: str, project: str, project_dir: str | None, config: dict[str, Any]) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        if cls.requires_logging_directory and not project_dir:
            raise ValueError("it needs an output dir")
        self.tracker = cls(project, project_dir) if cls.requires_logging_directory else cls(project)
        self.tracker.main_process_only = False  # it runs on the main process only: ours decides
        self.tracker.start()
        self.tracker.store_init_configuration(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log(metrics, step=step)

    def finish(self) -> None:
        self.tracker.finish()


def start_tracker(name: str, project: str, project_dir: str | None, config: dict[str, Any]):
    """A started tracker ``name`` (one of :data:`KNOWN_TRACKERS`) with ``log(metrics, step)``/``finish()``."""
    if name == "wandb":
        return WandbRun(project, project_dir, config)
    if name == "tensorboard":
        return TensorBoardRun(project, project_dir, config)
    return AccelerateRun(name, project, project_dir, config)


class Trackers:
    """The trackers named by ``report_to``, active only when ``is_main``; ``project_dir`` holds their
    local files (see the module docstring)."""

    def __init__(self, report_to: list[str], project_dir: str | None, is_main: bool) -> None:
        self.names = tracker_names(report_to) if is_main else []
        self.project_dir = project_dir
        self._running: list[Any] = []

    def start(self, project: str, config: dict[str, Any]) -> None:
        """Start every tracker and store ``config`` as the run's hyperparameters."""
        for name in self.names:
            try:
                self._running.append(start_tracker(name, project, self.project_dir, config))
            except Exception as exc:  # noqa: BLE001 - a tracker failing must not stop training
                logger.warning("tracker %s not started (%s); metrics.jsonl is still written", name, exc)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self._running:
            tracker.log(metrics, step)

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
