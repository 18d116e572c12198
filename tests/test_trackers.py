"""`--report_to` trackers, shared by the Accelerate and TP backends: names, main process only, wandb offline
into the output dir in a process without Accelerate state (as a TP job is), a tracker that cannot start is
dropped with a warning."""

from __future__ import annotations

import logging
import subprocess
import sys

from launch import REPO_ROOT, script_env

from rlhf.backend.trackers import Trackers, tracker_names


def test_tracker_names():
    assert tracker_names(["none"]) == []
    assert tracker_names(["all"]) == ["wandb", "tensorboard"]
    assert tracker_names(["wandb", "bogus"]) == ["wandb"]


def test_only_the_main_process_tracks(tmp_path, caplog):
    other = Trackers(["wandb"], str(tmp_path / "rank1"), is_main=False)
    other.start("proj", {"lr": 0.1})
    other.log({"loss": 1.0}, 1)
    other.end()
    assert not (tmp_path / "rank1").exists()

    broken = Trackers(["tensorboard"], None, is_main=True)  # tensorboard needs an output dir
    with caplog.at_level(logging.WARNING, logger="rlhf.backend.trackers"):
        broken.start("proj", {})
    broken.log({"loss": 1.0}, 1)  # no tracker running: a no-op
    assert "tracker tensorboard not started" in caplog.text


def test_wandb_logs_offline_into_the_output_dir_without_accelerate_state(tmp_path):
    code = (
        "import sys\n"
        "from accelerate.state import PartialState\n"
        "from rlhf.backend.trackers import Trackers\n"
        "t = Trackers(['wandb'], sys.argv[1], is_main=True)\n"
        "t.start('proj', {'lr': 0.1, 'targets': ['q_proj']})\n"
        "assert not PartialState._shared_state and len(t._running) == 1\n"
        "t.log({'loss': 1.0}, 1)\n"
        "t.end()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, env=script_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not started" not in proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
