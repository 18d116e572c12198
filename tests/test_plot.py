"""``rlhf.plot`` draws SFT/RM trainer_state.json and PPO metrics.jsonl curves."""

from __future__ import annotations

import json

import pytest

from rlhf.errors import UserError
from rlhf.plot import plot_run, read_metrics_jsonl, read_trainer_state


def test_trainer_state_curves(tmp_path):
    state = {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "grad_norm": 0.5},
                             {"step": 2, "eval_loss": 1.5, "eval_accuracy": 0.75}]}  # fmt: skip
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    series = read_trainer_state(tmp_path / "trainer_state.json")
    assert series["loss"] == [(1, 2.0), (2, 1.0)] and series["eval_accuracy"] == [(2, 0.75)]
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"loss.png", "grad_norm.png", "eval_loss.png", "eval_accuracy.png"}
    assert {p.parent for p in written} == {tmp_path / "plots"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_ppo_metrics_curves(tmp_path):
    rows = [{"step": s, "reward/score": 0.1 * s, "objective/kl": 0.01 * s} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics_jsonl(tmp_path / "metrics.jsonl")["reward/score"][-1] == (3, pytest.approx(0.3))
    names = {p.name for p in plot_run(tmp_path, tmp_path / "plots", prefix="ppo")}
    assert names == {"ppo_reward_score.png", "ppo_objective_kl.png"}


def test_empty_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="none of trainer_state.json, metrics.jsonl"):
        plot_run(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        plot_run(tmp_path / "missing")


def test_every_logged_number_is_a_curve_and_metrics_picks_some(tmp_path):
    rows = [{"step": s, "reward/score": 0.1 * s, "lr/actor": 1e-5, "time/rollout_s": 2.0, "rollouts": s}
            for s in range(1, 4)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert {p.name for p in plot_run(tmp_path)} == {"reward_score.png", "lr_actor.png", "time_rollout_s.png"}
    assert [p.name for p in plot_run(tmp_path, tmp_path / "some", metrics=["lr/actor"])] == ["lr_actor.png"]
    with pytest.raises(UserError, match="--metrics: loss not logged .* reward/score"):
        plot_run(tmp_path, metrics=["loss"])


def test_tensor_parallel_training_dir_and_a_torn_last_line(tmp_path):
    """A TP trainer's output dir keeps its curves in training/metrics.jsonl; a run killed mid-write leaves
    a last line without its newline, which is skipped (a bad line elsewhere names the file and line)."""
    (tmp_path / "training").mkdir()
    rows = [{"step": 10, "epoch": 1, "lr": 1e-5, "loss": 2.0, "grad_norm": 1.5, "tokens_per_second": 900.0},
            {"step": 20, "epoch": 1, "lr": 1e-5, "loss": 1.0, "grad_norm": 0.5, "tokens_per_second": 950.0}]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "training" / "metrics.jsonl").write_text(text + '{"step": 30, "lo')
    assert read_metrics_jsonl(tmp_path / "training" / "metrics.jsonl")["loss"] == [(10, 2.0), (20, 1.0)]
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"lr.png", "loss.png", "grad_norm.png", "tokens_per_second.png"}
    assert {p.parent for p in written} == {tmp_path / "training" / "plots"}  # not among the model files
    (tmp_path / "training" / "metrics.jsonl").write_text('{"step": 5, "lo\n' + text)
    with pytest.raises(UserError, match="metrics.jsonl:1: not a JSON object"):
        plot_run(tmp_path)
