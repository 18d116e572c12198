"""The backend interface: device placement, backward, optimizer step with gradient sync, collectives,
checkpoint state and exports, trackers.

The backend is the whole distribution strategy: a training loop or checkpoint writer calls these methods
and never asks which backend it has. Two implement it:

- :class:`rlhf.backend.accelerate.AccelerateBackend`: data parallel (one process, ``torchrun`` or
  ``accelerate launch``); every process holds the same **replicated** weights;
- :class:`rlhf.tp.backend.TPBackend`: the ``torchrun`` processes are the tensor-parallel ranks of one
  replica; each holds a **shard** of the weights.

Where the difference shows, it is declared here: :meth:`Backend.save_trainable` / :meth:`load_trainable`
put the trainable state in one place (replicated: ``trainable.safetensors`` and ``optimizer.pt`` in the
checkpoint dir, written by the main process) or one per process (sharded: in ``rank_K/``), and
:meth:`Backend.run_export` runs a model export on the main process only (replicated) or on every process
(sharded: the export is collective, each rank writing its shard).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

Optimizers = dict[str, torch.optim.Optimizer]  # one optimizer per parameter group ("actor", "critic", ...)
Schedulers = dict[str, Any]  # the learning-rate scheduler of each optimizer, by the same names
ParameterGroups = dict[str, list[torch.nn.Parameter]]  # each optimizer's parameters, by the same names


class Backend(Protocol):
    device: torch.device
    rank: int  # this process among all processes (names its per-process files, ``rank_K/``)
    world_size: int  # data-parallel replicas: how many different batches one step sees
    replica_rank: int  # this process's replica, 0 .. world_size - 1 (its data shard and sampling seed)

    @property
    def is_main(self) -> bool:
        """True on the process that writes shared files and logs."""

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Place a module on this process's device (and wrap it if the backend needs to)."""

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op in float32)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (the caller has already divided by the accumulation steps)."""

    def step(
        self, optimizers: Optimizers, schedulers: Schedulers, groups: ParameterGroups, max_norm: float
    ) -> dict[str, float]:
        """Average gradients over data-parallel processes, clip each group to ``max_norm``, step
        every optimizer and scheduler, zero the gradients. Returns the pre-clip norm per group."""

    def loss_scale(self) -> float | None:
        """The fp16 loss scale the next step's backward uses; None without loss scaling (fp32, bf16)."""

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over processes (every process gets the result)."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor's first dimension over processes."""

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over data-parallel replicas (every process gets the sum; the input is left as
        it is). Statistics over the tokens of all processes, e.g. global advantage whitening, use it."""

    def barrier(self) -> None:
        """Wait for every process."""

    def save_trainable(
        self, directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]
    ) -> None:
        """Write this process's trainable tensors (by stable name) and optimizer/scheduler state into the
        checkpoint dir being written. Every process calls it; which of them write, and where, is the
        backend's (see the module docstring). Format: :mod:`rlhf.backend.state_files`."""

    def load_trainable(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read back what :meth:`save_trainable` wrote for this process: (tensors on CPU, optimizer
        state). A missing or unreadable file raises :class:`rlhf.errors.CheckpointError` naming it."""

    def run_export(self, write: Callable[[], None]) -> None:
        """Run ``write`` (e.g. ``models.save_actor(dir)``) where the weights live: on the main process for
        replicated weights, on every process for sharded ones. No barrier: the caller adds one."""

    def init_trackers(self, project: str, config: dict[str, Any]) -> None:
        """Start the experiment trackers chosen at construction (wandb, tensorboard, ...)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send one step's metrics to the trackers."""

    def end(self) -> None:
        """Flush trackers and tear down."""
