"""bench/ppo.py's GPU suite runs end to end in its tiny CPU mode (``--gpu-suite --cpu-small``): the model
build, the prompts, a reward adapter written on the meta device, and ours with a critic, critic-free (K=8)
and on the larger shape with actor, critic and reward adapters, each in its own process; and the benchmark
model cache (``BENCH_MODEL_CACHE``) builds once and never leaves a partial build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from launch import script_env

REPO = Path(__file__).resolve().parents[1]


def test_reward_adapter_written_on_meta_loads_as_the_shared_reward(tiny_llama, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from ppo_workers import write_reward_adapter

    from rlhf.ppo.peft_factory import reward_adapter_shares_base
    from rlhf.ppo.peft_models import read_reward_adapter

    out = write_reward_adapter(tiny_llama, tmp_path / "rm")
    adapter = read_reward_adapter(str(out))
    assert adapter.score_weight.shape == (1, 64) and adapter.score_weight.abs().sum() > 0
    assert len(adapter.lora_state) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    assert reward_adapter_shares_base(str(out), str(tiny_llama))


@pytest.mark.slow
def test_gpu_suite_runs_in_its_tiny_cpu_mode(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = "ours-gae,ours-grpo,ours-large"
    command = [sys.executable, str(REPO / "bench" / "ppo.py"), "--gpu-suite", "--cpu-small", "--rows", rows,
               "--results", str(results)]  # fmt: skip
    proc = subprocess.run(
        command, env=script_env(BENCH_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert "<!-- ppo-gpu-cpu-small:start -->" in text
    table = [line for line in text.splitlines() if line.startswith("| ours")]
    assert [line.split(" | ")[0] for line in table] == [
        "| ours, PPO with critic (gae, K=1)",
        "| ours, critic-free (grpo, K=8)",
        "| ours on the large shape, PPO (gae): actor + critic + reward adapters",
    ]
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        samples, per_s, step, rollout, generate, train, first, peak = (float(c) for c in cells[1:9])
        assert 0 < generate <= rollout + 0.01 and first > 0
        assert samples in (16, 4) and per_s > 0 and peak > 0
        assert step == pytest.approx(
            samples / per_s, rel=0.02, abs=0.006
        )  # 2 decimals and rollout > 0 and train > 0


def test_cached_build_builds_once_links_each_run_and_leaves_no_partial(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    from harness import cached_build

    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setenv("BENCH_MODEL_CACHE", str(tmp_path / "cache"))
    first = cached_build("m", tmp_path / "run1" / "model", build)
    second = cached_build("m", tmp_path / "run2" / "model", build)
    assert len(builds) == 1 and first.is_symlink() and second.is_symlink()
    assert first.resolve() == second.resolve() == (tmp_path / "cache" / "m").resolve()
    assert (second / "config.json").read_text() == "{}"

    def broken(out: Path) -> None:
        out.mkdir(parents=True)
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cached_build("other", tmp_path / "run3" / "model", broken)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]  # no partial build left

    monkeypatch.delenv("BENCH_MODEL_CACHE")
    plain = cached_build("m", tmp_path / "run4" / "model", build)
    assert len(builds) == 2 and not plain.is_symlink()


def test_deadline_skips_by_each_rows_estimate_and_results_survive_trailing_output(monkeypatch):
    """A slow row (a cold compile) used to set the bar for every later row, so quick rows were skipped with
    time left; and a worker printing after its JSON line crashed the whole suite."""
    sys.path.insert(0, str(REPO / "bench"))
    import harness

    ran = []
    monkeypatch.setattr(
        harness, "run_worker", lambda script, name, *a, **k: ran.append(name) or {"name": name}
    )
    deadline = harness.Deadline(50.0, estimates={"compiled": 40.0, "quick": 10.0})
    deadline.longest = 45.0  # as if an estimate-less row had run that long
    assert deadline.run("s", "quick", Path("."))["name"] == "quick"
    assert deadline.needs("other") == 45.0 and deadline.needs("compiled") == 40.0
    monkeypatch.setattr(deadline, "left", lambda: 30.0)
    assert deadline.run("s", "compiled", Path("."))["error"] == "skipped: needs ~40 s, 30 s left"
    assert ran == ["quick"]
    assert harness.last_json_line("x", '{"name": "x", "v": 1}\nwarning: done\n') == {"name": "x", "v": 1}
    assert "no JSON result line" in harness.last_json_line("x", "only text\n")["error"]
