"""`--report_to` trackers, shared by the Accelerate and TP backends: names, main process only, wandb offline
into the output dir, a tracker that cannot start is dropped with a warning."""

from __future__ import annotations

import logging

from rlhf.backend.trackers import Trackers, tracker_names


def test_tracker_names():
    assert tracker_names(["none"]) == []
    assert tracker_names(["all"]) == ["wandb", "tensorboard"]
    assert tracker_names(["wandb", "bogus"]) == ["wandb"]


def test_wandb_logs_offline_into_the_output_dir_on_the_main_process_only(tmp_path, monkeypatch, caplog):
    for key in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    other = Trackers(["wandb"], str(tmp_path / "rank1"), is_main=False)
    other.start("proj", {"lr": 0.1})
    other.log({"loss": 1.0}, 1)
    other.end()
    assert not (tmp_path / "rank1").exists()

    main = Trackers(["wandb"], str(tmp_path), is_main=True)
    main.start("proj", {"lr": 0.1})
    main.log({"loss": 1.0}, 1)
    main.end()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))

    broken = Trackers(["tensorboard"], None, is_main=True)  # tensorboard needs an output dir
    with caplog.at_level(logging.WARNING, logger="rlhf.backend.trackers"):
        broken.start("proj", {})
    broken.log({"loss": 1.0}, 1)  # no tracker running: a no-op
    assert "tracker tensorboard not started" in caplog.text
