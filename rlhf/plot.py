"""``python -m rlhf.plot RUN_DIR``: draw a run's training curves as PNG files.

Reads ``RUN_DIR/trainer_state.json`` (SFT and reward-model runs: ``loss``, ``eval_loss``,
``eval_accuracy``, ``learning_rate`` ...), ``RUN_DIR/metrics.jsonl`` (PPO runs, ours and the TP
backend's: ``reward/score``, ``objective/kl``, ``loss/policy`` ...) and ``RUN_DIR/training/metrics.jsonl``
(a tensor-parallel trainer's output dir: ``loss``, ``lr``, ``grad_norm`` ...), and writes one PNG per
numeric metric into ``--out`` (default: ``RUN_DIR/plots``, ``RUN_DIR/training/plots`` for a TP dir), named after the metric (``loss.png``,
``reward_score.png``, ...). ``--metrics`` picks some of them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf.errors import UserError, exit_on_user_error  # noqa: E402

logger = logging.getLogger(__name__)

# Not curves: the x axis, counters, and the one-off summary a Trainer logs at the end of training.
NOT_CURVES = frozenset((
    "step", "epoch", "rollouts", "eval/prompts", "total_flos", "train_runtime", "train_samples_per_second",
    "train_steps_per_second", "train_loss",
))  # fmt: skip
METRICS_FILES = ("metrics.jsonl", "training/metrics.jsonl")

Series = dict[str, list[tuple[float, float]]]


def add_entry(series: Series, entry: dict) -> None:
    """Append every numeric metric of one logged ``entry`` (with a ``step``) to ``series``."""
    step = entry.get("step")
    if not isinstance(step, (int, float)):
        return
    for key, value in entry.items():
        if key not in NOT_CURVES and isinstance(value, (int, float)) and not isinstance(value, bool):
            series.setdefault(key, []).append((step, float(value)))


def read_trainer_state(path: Path) -> Series:
    """``{metric: [(step, value), ...]}`` from a transformers ``trainer_state.json`` log history."""
    try:
        history = json.loads(path.read_text()).get("log_history", [])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from exc
    series: Series = {}
    for entry in history:
        add_entry(series, entry)
    return series


def read_metrics_jsonl(path: Path) -> Series:
    """``{metric: [(step, value), ...]}`` from a ``metrics.jsonl`` (one JSON object per logging step). A
    torn last line (a run killed mid-write) is skipped; a bad line elsewhere is an error naming it."""
    series: Series = {}
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: a write cut short
                continue
            raise UserError(f"{path}:{number}: not a JSON object ({exc})") from exc
        if isinstance(entry, dict):
            add_entry(series, entry)
    return series


def read_run(run_dir: Path) -> Series:
    """Every curve found in ``run_dir`` (trainer_state.json and the metrics.jsonl files)."""
    series: Series = {}
    if (run_dir / "trainer_state.json").is_file():
        series.update(read_trainer_state(run_dir / "trainer_state.json"))
    for name in METRICS_FILES:
        if (run_dir / name).is_file():
            series.update(read_metrics_jsonl(run_dir / name))
    return series


def plot_series(name: str, points: list[tuple[float, float]], out: Path, title: str = "") -> Path:
    """One line plot of ``points`` saved as ``out/<name with / as _>.png``."""
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(title or name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{name.replace('/', '_')}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def default_out(run_dir: Path) -> Path:
    """``RUN_DIR/plots``, or ``RUN_DIR/training/plots`` for a tensor-parallel trainer's dir (whose
    ``training/`` holds what is not model files, so that a merge copies none of it)."""
    if not (run_dir / "metrics.jsonl").is_file() and (run_dir / "training" / "metrics.jsonl").is_file():
        return run_dir / "training" / "plots"
    return run_dir / "plots"


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, prefix: str = "", metrics: Sequence[str] | None = None
) -> list[Path]:
    """Plot every curve of a run (or only ``metrics``); return the written PNG paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (pass a run's output dir)")
    series = read_run(run_dir)
    if not series:
        found = ", ".join(("trainer_state.json",) + METRICS_FILES)
        raise UserError(f"{run_dir}: none of {found} with metrics to plot")
    if metrics:
        unknown = [name for name in metrics if name not in series]
        if unknown:
            raise UserError(
                f"--metrics: {', '.join(unknown)} not logged in {run_dir} (it has: {', '.join(sorted(series))})"
            )
        series = {name: series[name] for name in metrics}
    out = Path(out) if out else default_out(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    title_prefix = f"{prefix}: " if prefix else ""
    written = [
        plot_series(f"{prefix}{'_' if prefix else ''}{name}", points, out, title_prefix + name)
        for name, points in series.items()
    ]
    logger.info("wrote %d plot(s) to %s", len(written), out)
    return written


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output dir (with trainer_state.json or metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="where to write the PNGs (default: RUN_DIR/plots; RUN_DIR/training/plots for a TP trainer's dir)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these metrics (default: every one logged)",
    )
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out, metrics=args.metrics):
        print(path)


if __name__ == "__main__":
    main()
