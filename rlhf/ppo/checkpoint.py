"""Checkpoints that resume bit-exactly: trainable weights, optimizer and scheduler states, every RNG
state, data positions, the step, and the rollout in progress.

Layout of ``checkpoint-N/``::

    actor/  critic/              the actor and critic as loadable exports (adapters + value head);
                                 no critic/ for a critic-free --advantage_estimator
    trainable.safetensors        every trainable tensor by name (what resuming loads)
    optimizer.pt                 optimizer and scheduler states (torch.load with weights_only=True)
    trainer_state.json           step, data positions, KL coefficient (shared by all processes)
    rank_K/rng.pt, rank_K/state.json, rank_K/buffer.safetensors   per process: RNG, pending metrics,
                                 rollout in progress, a checksum of the weights (replicas must agree)

Where the trainable state and the exports are written is the backend's business
(:meth:`rlhf.backend.Backend.save_trainable`, :meth:`~rlhf.backend.Backend.run_export`): with replicated
weights (Accelerate) one copy as above; with sharded weights (tensor parallel) ``trainable.safetensors``
and ``optimizer.pt`` sit in each ``rank_K/`` and every process takes part in the exports.

A checkpoint is written into a hidden staging dir and published under its name when complete
(:mod:`rlhf.publish`), so a kill never leaves a half-written ``checkpoint-N``. A file damaged later (a full
disk, a copy cut short) is reported by name; :func:`newest_loadable_checkpoint` finds the newest
checkpoint whose files are whole, for an implicit resume.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.backend import Backend
from rlhf.backend.state_files import (
    OPTIMIZER,
    TRAINABLE,
    check_file,
    load_torch_file_checked,
    rank_dir,
    read_file,
)
from rlhf.checkpoint_dirs import list_checkpoints, newest_loadable
from rlhf.errors import CheckpointError
from rlhf.ppo.batch import RolloutBuffer
from rlhf.ppo.policy_interface import PolicyModels
from rlhf.publish import publish_dir, staging_dir, staging_path

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RANK_FILES = ("state.json", "rng.pt")  # every rank_K/ has these; buffer.safetensors only mid-rollout


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
    trainable = models.trainable_state()
    checksum = sum(float(t.double().square().sum()) for t in trainable.values())
    with staged_checkpoint(directory, backend, {"weights_checksum": checksum, **rank_state}) as tmp:
        if buffer is not None:
            save_file(
                {k: v.contiguous().cpu() for k, v in buffer.tensors().items()},
                str(rank_dir(tmp, backend.rank) / "buffer.safetensors"),
            )
        backend.save_trainable(tmp, trainable, optimizer_states(optimizers, schedulers))

        def export() -> None:
            models.save_actor(tmp / "actor")
            if models.has_critic:
                models.save_critic(tmp / "critic")

        backend.run_export(export)
        if backend.is_main:
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
            (tmp / TRAINER_STATE).write_text(json.dumps(shared_state, indent=1))


def optimizer_states(optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]) -> dict:
    """What ``optimizer.pt`` holds: every optimizer's and scheduler's state dict, by name."""
    return {
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
    }


@contextmanager
def staged_checkpoint(directory: Path, backend: Backend, rank_state: dict[str, Any]) -> Iterator[Path]:
    """Every process: a staging dir for ``directory`` with this process's ``rank_K/rng.pt`` and
    ``rank_K/state.json`` (its RNG states and ``rank_state``) written; the caller fills the rest; published
    by the main process once every process is done. On an error nothing is published."""
    tmp = staging_path(directory)
    if backend.is_main:
        staging_dir(directory)
    backend.barrier()
    own = rank_dir(tmp, backend.rank)
    own.mkdir()
    plain_rng, tensor_rng = capture_rng()
    torch.save(tensor_rng, own / "rng.pt")
    (own / "state.json").write_text(json.dumps({"rng": plain_rng, **rank_state}))
    yield tmp
    backend.barrier()
    if backend.is_main:
        publish_dir(tmp, directory)
        logger.info("saved %s", directory)
    backend.barrier()


def load_buffer_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A rank's saved rollout buffer on ``device``. safetensors takes ``"cuda:1"`` but refuses ``"cpu:0"``,
    the device Accelerate gives each process of a multi-process CPU run."""
    return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))


def load_checkpoint(
    directory: Path,
    *,
    backend: Backend,
    models: PolicyModels,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], RolloutBuffer | None]:
    """Restore weights, optimizer/scheduler states and this process's RNG.

    Returns (shared_state, rank_state, buffer or None). A missing or damaged file raises a
    :class:`CheckpointError` naming it; so does a checkpoint whose recorded settings differ from
    ``settings`` (:func:`check_resume_settings`, before anything is loaded)."""
    own = rank_dir(directory, backend.rank)
    if not (directory / TRAINER_STATE).is_file():
        raise CheckpointError(f"{directory}: not a complete PPO checkpoint (no {TRAINER_STATE})")
    # the settings first: every process reads the same file, so all stop together on a mismatch (a changed
    # number of processes among them)
    shared = read_file(directory / TRAINER_STATE, lambda p: json.loads(p.read_text()))
    if settings is not None:
        check_resume_settings(directory, shared.get("settings"), settings)
    if not own.is_dir():
        raise CheckpointError(
            f"{directory}: not a complete PPO checkpoint for process {backend.rank} "
            f"(needs {own.name}/; was it written with this many processes?)"
        )
    weights, states = backend.load_trainable(directory)
    models.load_trainable_state(weights)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(states["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(states["schedulers"][name])
    rank_state = read_file(own / "state.json", lambda p: json.loads(p.read_text()))
    tensor_rng = read_file(own / "rng.pt", load_torch_file_checked)
    restore_rng(rank_state.pop("rng"), tensor_rng)
    rank_state.pop("weights_checksum", None)
    buffer = None
    if (own / "buffer.safetensors").is_file():
        tensors = read_file(own / "buffer.safetensors", lambda p: load_buffer_tensors(p, backend.device))
        buffer = RolloutBuffer.from_tensors(tensors)
    logger.info("resumed from %s at step %d", directory, shared["step"])
    return shared, rank_state, buffer


def check_resume_settings(directory: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume from ``directory`` when the run that wrote it had other ``saved`` settings than
    ``current`` (what decides the position in the data and the optimizer steps: resuming would silently
    mean something else); a checkpoint that recorded none is not checked. A key that names a flag is shown
    as ``--flag``; one with spaces is a description, and ``files of ...`` (a :func:`rlhf.data.files.files_signature`) is
    only said to have changed."""
    if saved is None:
        return
    # a setting the checkpoint did not record (written by an earlier version) is not held against it
    changed = [k for k in sorted(saved) if saved[k] != current.get(k)]
    if not changed:
        return
    shown = "; ".join(
        f"the {k} changed" if k.startswith("files of ")
        else f"{k if ' ' in k else '--' + k} {saved.get(k)!r} there, {current.get(k)!r} now"
        for k in changed[:3]
    )  # fmt: skip
    raise CheckpointError(
        f"{directory} was written by a run with other settings ({shown}): resume with the same flags and data, "
        "or pass --overwrite_output_dir to start afresh"
    )


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The published ``checkpoint-N`` dirs of ``output_dir``, oldest (smallest N) first."""
    return list_checkpoints(output_dir)[::-1]


def checkpoint_problem(directory: Path) -> str | None:
    """Why resuming from ``directory`` would fail on its files (one line naming the file), or ``None``.

    Checks that the files resuming reads exist and are whole (:func:`rlhf.backend.state_files.check_file`):
    ``trainer_state.json``, every ``rank_K/`` with its RNG and state, and ``trainable.safetensors`` plus
    ``optimizer.pt`` either once (replicated weights) or in every ``rank_K/`` (sharded weights)."""
    if not (directory / TRAINER_STATE).is_file():
        return f"{directory / TRAINER_STATE}: missing"
    ranks = sorted(p for p in directory.glob("rank_*") if p.is_dir())
    if not ranks:
        return f"{directory}: no rank_K/ dirs"
    weight_dirs = [directory] if (directory / TRAINABLE).exists() else ranks
    needed = [directory / TRAINER_STATE]
    needed += [r / name for r in ranks for name in RANK_FILES]
    needed += [r / "buffer.safetensors" for r in ranks if (r / "buffer.safetensors").exists()]
    needed += [d / name for d in weight_dirs for name in (TRAINABLE, OPTIMIZER)]
    for path in needed:
        reason = "missing" if not path.is_file() else check_file(path)
        if reason:
            return f"{path}: {reason}"
    return None


def newest_loadable_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` of ``output_dir`` whose files are whole, or ``None``; each newer one that
    is damaged is skipped with a warning naming the bad file."""
    return newest_loadable(output_dir, checkpoint_problem)[0]
