"""Checkpoints of ``solver_train`` / ``verifier_train``: a TP supervised run resumes bit-exactly.

Layout of ``<output_dir>/checkpoint-N/``, the same files as a PPO checkpoint (:mod:`rlhf.ppo.checkpoint`),
so the same checks find a damaged one and the same rules pick where a run starts
(:func:`rlhf.ppo.resume.resume_checkpoint`)::

    trainer_state.json            the run's position: step, epoch, micro-batches of the epoch done, the
                                  rows logged so far, metrics pending since the last log (rank 0 writes it)
    rank_K/trainable.safetensors  this rank's slice of every trainable tensor
    rank_K/optimizer.pt           its AdamW and scheduler states (torch.load with weights_only=True)
    rank_K/rng.pt, state.json     its RNG states (LoRA dropout)

Written into a staging dir by every rank and published by rank 0 when complete (:mod:`rlhf.publish`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.backend.state_files import load_torch_file_checked, rank_dir, read_file
from rlhf.checkpoint_dirs import rotate_checkpoints
from rlhf.errors import CheckpointError
from rlhf.ppo.checkpoint import (
    TRAINER_STATE,
    check_resume_settings,
    optimizer_states,
    restore_rng,
    staged_checkpoint,
)
from rlhf.tp.backend import TPBackend

logger = logging.getLogger(__name__)


@dataclass
class FitState:
    """Where a supervised TP run is: what a checkpoint records besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done, over all epochs
    epoch: int = 0  # the epoch in progress (0-based)
    done_in_epoch: int = 0  # micro-batches of that epoch already trained on
    log: list[dict[str, Any]] = field(default_factory=list)  # rows written to training/metrics.jsonl
    pending: dict[str, list[float]] = field(default_factory=dict)  # metrics since the last logged row
    settings: dict[str, Any] = field(default_factory=dict)  # what a resumed run must share (resume_settings)


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_fit_checkpoint(
    directory: Path,
    backend: TPBackend,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: FitState,
    save_total_limit: int | None,
) -> None:
    """Write ``directory`` (every rank calls this), then keep the newest ``save_total_limit`` checkpoints."""
    with staged_checkpoint(directory, backend, {}) as tmp:
        states = optimizer_states({"model": optimizer}, {"model": scheduler})
        backend.save_trainable(tmp, trainable_tensors(model), states)
        if backend.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
    if backend.is_main:
        rotate_checkpoints(directory.parent, save_total_limit, directory)


def load_fit_checkpoint(
    directory: Path,
    backend: TPBackend,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: dict[str, Any],
) -> FitState:
    """Restore this rank's trainable tensors, optimizer, scheduler and RNG from ``directory``; the run's
    position. A missing or damaged file, a run with other ``settings`` (its position in the data would mean
    something else) or tensors of another model raise a one-line CheckpointError."""
    state = FitState(**read_file(directory / TRAINER_STATE, lambda p: json.loads(p.read_text())))
    check_resume_settings(directory, state.settings, settings)
    tensors, states = backend.load_trainable(directory)
    params = trainable_tensors(model)
    if tensors.keys() != params.keys() or any(tensors[k].shape != p.shape for k, p in params.items()):
        missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise CheckpointError(
            f"{directory}: its trainable tensors do not fit this model and flags (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, or other shapes): resume with the flags and TP degree it was "
            "written with, or pass --overwrite_output_dir"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(states["optimizers"]["model"])
    scheduler.load_state_dict(states["schedulers"]["model"])
    own = rank_dir(directory, backend.rank)
    rank_state = read_file(own / "state.json", lambda p: json.loads(p.read_text()))
    restore_rng(rank_state["rng"], read_file(own / "rng.pt", load_torch_file_checked))
    logger.info("resumed from %s at step %d", directory, state.step)
    return state
