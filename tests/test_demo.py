"""A shortened ``make demo`` writes summary.json, the plots and the report."""

from __future__ import annotations

import json

import pytest

from rlhf.demo import first_last_means, main


def test_first_last_means_shrink_for_short_curves():
    assert first_last_means([(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0)]) == (2.0, 5.0)
    assert first_last_means([(1, 1.0), (2, 3.0)]) == (1.0, 3.0)
    assert first_last_means([(1, 2.0)]) == (2.0, 2.0)


@pytest.mark.slow
def test_quick_demo_writes_summary_plots_and_report(tmp_path):
    summary = main(["--out", str(tmp_path), "--quick"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("sft_loss_first", "sft_loss_last", "rm_eval_accuracy", "ppo_reward_first", "ppo_reward_last",
                "wall_seconds"):  # fmt: skip
        assert isinstance(on_disk[key], float), key
    assert on_disk == json.loads(json.dumps(summary))
    plots = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"sft_loss.png", "rm_eval_accuracy.png", "ppo_reward_score.png", "ppo_objective_kl.png"} <= plots
    report = (tmp_path / "report.md").read_text()
    assert "![ppo_reward_score](plots/ppo_reward_score.png)" in report
    assert report.count("\n| ") >= 10  # the numbers table and the before/after sample rows
    assert (tmp_path / "ppo_actor" / "adapter_model.safetensors").is_file()
