"""bench/host_syncs.py counts the calls that make the host wait for the device in a PPO step: its worker runs,
and the loop itself reads the update's values once per optimizer step, not once per mini-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_the_update_reads_the_device_once_per_optimizer_step(tmp_path, estimator):
    command = [sys.executable, str(REPO / "bench" / "host_syncs.py"), "--worker", str(REPO), "--estimator", estimator,
               "--work", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["decode_steps"] == 31 and result["mini_batches"] == 2  # 32 tokens; 16 samples, mini-batch 8
    loop_reads = [
        site for site in result["sites"] if site[1] == "update" and site[3].startswith("rlhf/ppo/loop.py")
    ]
    assert [n for n, *_ in loop_reads] == [1], (
        loop_reads
    )  # settle_mini_batches' one copy for both mini-batches
    assert result["phases"]["generation"] <= 5  # a stop check every few decode steps and the final length
