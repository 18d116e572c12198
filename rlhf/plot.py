"""``python -m rlhf.plot RUN_DIR``: draw a run's training curves as PNG files.

Reads ``RUN_DIR/trainer_state.json`` (SFT and reward-model runs: ``loss``, ``eval_loss``,
``eval_accuracy``, ``learning_rate`` ...) and/or ``RUN_DIR/metrics.jsonl`` (PPO runs: ``reward/score``,
``objective/kl``, ``loss/policy`` ...) and writes one PNG per metric into ``--out`` (default: RUN_DIR),
named after the metric (``loss.png``, ``reward_score.png``, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf.errors import UserError, exit_on_user_error  # noqa: E402

logger = logging.getLogger(__name__)

TRAINER_METRICS = ("loss", "eval_loss", "eval_accuracy", "eval_margin", "grad_norm", "learning_rate")
PPO_METRICS = (
    "reward/score", "objective/kl", "objective/rlhf_reward", "loss/policy", "loss/value", "loss/pretrain",
    "policy/entropy", "policy/clipfrac", "value/explained_variance", "response/length_mean",
)  # fmt: skip

Series = dict[str, list[tuple[float, float]]]


def read_trainer_state(path: Path) -> Series:
    """``{metric: [(step, value), ...]}`` from a transformers ``trainer_state.json`` log history."""
    history = json.loads(path.read_text()).get("log_history", [])
    series: Series = {}
    for entry in history:
        step = entry.get("step")
        for key in TRAINER_METRICS:
            if step is not None and isinstance(entry.get(key), (int, float)):
                series.setdefault(key, []).append((step, float(entry[key])))
    return series


def read_metrics_jsonl(path: Path) -> Series:
    """``{metric: [(step, value), ...]}`` from a PPO ``metrics.jsonl``."""
    series: Series = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        for key in PPO_METRICS:
            if isinstance(entry.get(key), (int, float)):
                series.setdefault(key, []).append((entry["step"], float(entry[key])))
    return series


def read_run(run_dir: Path) -> Series:
    """Every curve found in ``run_dir`` (trainer_state.json and metrics.jsonl)."""
    series: Series = {}
    if (run_dir / "trainer_state.json").is_file():
        series.update(read_trainer_state(run_dir / "trainer_state.json"))
    if (run_dir / "metrics.jsonl").is_file():
        series.update(read_metrics_jsonl(run_dir / "metrics.jsonl"))
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


def plot_run(run_dir: str | Path, out: str | Path | None = None, prefix: str = "") -> list[Path]:
    """Plot every curve of a run; return the written PNG paths."""
    run_dir = Path(run_dir)
    series = read_run(run_dir)
    if not series:
        raise UserError(f"{run_dir}: no trainer_state.json or metrics.jsonl with metrics to plot")
    out = Path(out) if out else run_dir
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
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
