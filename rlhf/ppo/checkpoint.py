"""Checkpoints that resume bit-exactly: trainable weights, optimizer and scheduler states, every RNG
state, data positions, the step, and the rollout in progress.

Layout of ``checkpoint-N/``::

    actor/  critic/              the actor and critic as loadable exports (adapters + value head)
    trainable.safetensors        every trainable tensor by name (what resuming loads)
    optimizer.pt                 optimizer and scheduler states (torch.load with weights_only=True)
    trainer_state.json           step, data positions, KL coefficient (shared by all processes)
    rank_K/rng.pt, rank_K/state.json, rank_K/buffer.safetensors   per process: RNG, pending metrics,
                                 rollout in progress, a checksum of the weights (replicas must agree)

A checkpoint is written into ``checkpoint-N.tmp`` and renamed when complete, so a kill never leaves a
half-written ``checkpoint-N``.

A backend whose processes each hold a different slice of the weights (tensor parallelism: its
``per_process_weights`` is true) gets ``trainable.safetensors`` and ``optimizer.pt`` in each ``rank_K/``
instead, and every process takes part in the actor and critic exports (they are collective there).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.backend import Backend
from rlhf.errors import CheckpointError
from rlhf.ppo.batch import RolloutBuffer
from rlhf.ppo.models import PolicyModels

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON-able python/numpy states, torch states)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }
    tensors: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_checkpoint(
    directory: Path,
    *,
    backend: Backend,
    models: PolicyModels,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    shared_state: dict[str, Any],
    rank_state: dict[str, Any],
    buffer: RolloutBuffer | None,
    extra_files: dict[str, Any] | None = None,
) -> None:
    """Write ``directory`` atomically (all processes call this)."""
    per_process = getattr(backend, "per_process_weights", False)
    tmp = directory.with_name(directory.name + ".tmp")
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    rank_dir = tmp / f"rank_{backend.rank}"
    rank_dir.mkdir()
    plain_rng, tensor_rng = capture_rng()
    torch.save(tensor_rng, rank_dir / "rng.pt")
    checksum = sum(float(t.double().square().sum()) for t in models.trainable_state().values())
    (rank_dir / "state.json").write_text(
        json.dumps({"rng": plain_rng, "weights_checksum": checksum, **rank_state})
    )
    if buffer is not None:
        save_file(
            {k: v.contiguous().cpu() for k, v in buffer.tensors().items()},
            str(rank_dir / "buffer.safetensors"),
        )
    if backend.is_main or per_process:
        models.save_actor(tmp / "actor")
        models.save_critic(tmp / "critic")
        weights_dir = rank_dir if per_process else tmp
        save_file(
            {k: v.cpu() for k, v in models.trainable_state().items()},
            str(weights_dir / "trainable.safetensors"),
        )
        torch.save(
            {
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            },
            weights_dir / "optimizer.pt",
        )
    if backend.is_main:
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        (tmp / TRAINER_STATE).write_text(json.dumps(shared_state, indent=1))
    backend.barrier()
    if backend.is_main:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        logger.info("saved %s", directory)
    backend.barrier()


def load_checkpoint(
    directory: Path,
    *,
    backend: Backend,
    models: PolicyModels,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], RolloutBuffer | None]:
    """Restore weights, optimizer/scheduler states and this process's RNG.

    Returns (shared_state, rank_state, buffer or None)."""
    rank_dir = directory / f"rank_{backend.rank}"
    if not (directory / TRAINER_STATE).is_file() or not rank_dir.is_dir():
        raise CheckpointError(
            f"{directory}: not a complete PPO checkpoint for process {backend.rank} "
            f"(needs {TRAINER_STATE} and rank_{backend.rank}/; was it written with this many processes?)"
        )
    weights_dir = rank_dir if getattr(backend, "per_process_weights", False) else directory
    weights = load_file(str(weights_dir / "trainable.safetensors"))
    models.load_trainable_state(weights)
    states = torch.load(weights_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(states["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(states["schedulers"][name])
    shared = json.loads((directory / TRAINER_STATE).read_text())
    rank_state = json.loads((rank_dir / "state.json").read_text())
    restore_rng(rank_state.pop("rng"), torch.load(rank_dir / "rng.pt", weights_only=True))
    rank_state.pop("weights_checksum", None)
    buffer = None
    if (rank_dir / "buffer.safetensors").is_file():
        tensors = load_file(str(rank_dir / "buffer.safetensors"), device=str(backend.device))
        buffer = RolloutBuffer.from_tensors(tensors)
    logger.info("resumed from %s at step %d", directory, shared["step"])
    return shared, rank_state, buffer


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-N`` dirs."""
    if not keep or keep <= 0:
        return
    found = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
