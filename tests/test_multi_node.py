"""Multi-node runs, two nodes of one process each on this machine (a shared file system): the same job as
one node of two processes, to the bit. Rank 1 then has LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1, so code that
took the local rank or the local world for the global one (who writes, which rows a process takes, how
many processes a checkpoint holds) would diverge or collide here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun, two_nodes
from safetensors.torch import load_file
from test_ppo_models import build_rm_adapter
from test_ppo_run import resume_argv
from test_tp_train import addition_rows

REPO = Path(__file__).resolve().parents[1]


def one_node(args: list[str], env: dict[str, str]) -> None:
    run = subprocess.run(
        [*torchrun(2), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def metrics_without_times(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "samples_per_s"))} for row in rows]


@pytest.mark.slow
def test_ppo_two_nodes_equal_one_node(tiny_llama, tmp_path):
    rm = build_rm_adapter(tiny_llama, tmp_path / "rm")
    runs = {}
    for name in ("one_node", "two_nodes"):
        out = runs[name] = tmp_path / name
        argv = resume_argv(tiny_llama, rm, out)
        argv[argv.index("--max_steps") + 1] = "2"
        argv[argv.index("--logging_steps") + 1] = "1"
        argv[argv.index("--save_steps") + 1] = "1"
        args, env = ["run_ppo_with_peft.py", *argv, "--report_to", "none"], script_env()
        one_node(args, env) if name == "one_node" else two_nodes(args, env, REPO)
    one, two = runs["one_node"], runs["two_nodes"]
    rows = metrics_without_times(two / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert rows == metrics_without_times(one / "metrics.jsonl")
    for name in (
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "critic/value_head.safetensors",
    ):
        assert same_tensors(one / name, two / name), name
    for rank in (0, 1):  # each global rank wrote its own part of the checkpoint, none overwrote another's
        assert same_tensors(
            one / "checkpoint-2" / f"rank_{rank}" / "buffer.safetensors",
            two / "checkpoint-2" / f"rank_{rank}" / "buffer.safetensors",
        )


@pytest.mark.slow
def test_tp_solver_train_two_nodes_equal_one_node(tiny_llama, tmp_path):
    """TP=2 across the two nodes: rank 1's shard comes from the other node's process."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in addition_rows(16)))
    for name in ("one_node", "two_nodes"):
        args = [
            "-m", "rlhf.tp.solver_train", "--ckpt_dir", str(tiny_llama), "--save_dir", str(tmp_path / name),
            "--train_file", str(data), "--max_batch_size", "4", "--epochs", "1", "--lr", "1e-3",
            "--max_seq_len", "64", "--seed", "1",
        ]  # fmt: skip
        one_node(args, script_env()) if name == "one_node" else two_nodes(args, script_env(), REPO)
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "one_node" / shard, weights_only=True)
        b = torch.load(tmp_path / "two_nodes" / shard, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard
    results = json.loads((tmp_path / "two_nodes" / "training" / "results.json").read_text())
    assert results["tensor_parallel"] == 2
