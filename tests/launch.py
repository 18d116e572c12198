"""How tests start the entry scripts: a child environment that owns what the test relies on, and torchrun
on a free port.

A test never inherits ``WANDB_DIR``, ``WANDB_MODE``, ``WANDB_API_KEY``, ``MASTER_PORT`` or the like from the
shell that runs pytest: :func:`script_env` sets or removes them, so a wandb user's environment cannot change
where a child logs. :func:`torchrun` binds each launch to a port that was free a moment ago instead of a
fixed port or ``--standalone`` (whose rendezvous raced under load).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Variables of the caller's shell that would change what a child process does.
_INHERITED_OUT = (
    "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
    "WANDB_SILENT", "WANDB_CONSOLE", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "ACCELERATE_CONFIG_FILE", "CUDA_VISIBLE_DEVICES_OVERRIDE",
)  # fmt: skip


def script_env(wandb_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process: offline, single-threaded, the repo importable.

    wandb logs offline; into ``wandb_dir`` when given, else where the script itself puts it (its output
    dir), never where the caller's ``WANDB_DIR`` points."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_OUT}
    env.update(
        WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )  # fmt: skip
    if wandb_dir is not None:
        env["WANDB_DIR"] = str(wandb_dir)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes on a free port."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip


def two_nodes(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> list[str]:
    """Run ``args`` (a script and its flags) as a job of two nodes of one process each, both on this
    machine (``--nnodes 2``, a launcher per ``--node_rank``, one rendezvous): node 1 holds global rank 1
    with LOCAL_RANK 0, as on a second machine that shares the file system. Returns each node's stderr,
    node 0's first; AssertionError with both when either launcher fails or the job outlives ``timeout``
    seconds (then each launcher is stopped as Ctrl-C would, its workers with it)."""
    port = str(free_port())

    def launcher(node_rank: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, *args,
        ]  # fmt: skip

    with tempfile.TemporaryDirectory() as logs:
        paths = [Path(logs) / f"node{rank}.err" for rank in (0, 1)]
        nodes: list[subprocess.Popen] = []
        for rank in (0, 1):
            with open(paths[rank], "w") as err:  # a file, not a pipe: no node blocks on a full pipe
                nodes.append(
                    subprocess.Popen(
                        launcher(rank),
                        env=env,
                        cwd=cwd,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )  # fmt: skip
                )
        deadline, timed_out = time.monotonic() + timeout, False
        try:
            for node in nodes:
                node.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # SIGTERM: torchrun stops its workers (in sessions of their own) before it exits
            for node in nodes:
                if node.poll() is None:
                    node.send_signal(signal.SIGTERM)
            for node in nodes:
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
        stderrs = [path.read_text() for path in paths]
    failed = [rank for rank, node in enumerate(nodes) if node.returncode != 0]
    assert not failed, f"timed out after {timeout} s\n" * timed_out + "\n".join(
        f"node {rank} (exit {nodes[rank].returncode}):\n{err[-3000:]}" for rank, err in enumerate(stderrs)
    )
    return stderrs


GLOO_THREADS_AFTER = Path(__file__).with_name("gloo_threads_after.py")


def freed_process_groups(stderr: str, nproc: int) -> bool:
    """Whether every process of a run launched through ``gloo_threads_after.py`` ended with no gloo thread:
    its process group was freed while the interpreter was alive, not at its exit."""
    return stderr.count(" 0 gloo thread(s) left") == nproc
