"""The backend interface: device placement, backward, optimizer step with gradient sync, collectives,
trackers. :class:`rlhf.backend.accelerate.AccelerateBackend` implements it on Accelerate (one process,
``torchrun`` or ``accelerate launch``); a tensor-parallel backend implements the same methods."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class Backend(Protocol):
    device: torch.device
    rank: int
    world_size: int

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
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        parameter_groups: dict[str, list[torch.nn.Parameter]],
        max_grad_norm: float,
    ) -> dict[str, float]:
        """Average gradients over data-parallel processes, clip each group to ``max_grad_norm``, step
        every optimizer and scheduler, zero the gradients. Returns the pre-clip norm per group."""

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over processes (every process gets the result)."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor's first dimension over processes."""

    def barrier(self) -> None:
        """Wait for every process."""

    def init_trackers(self, project: str, config: dict[str, Any]) -> None:
        """Start the experiment trackers chosen at construction (wandb, tensorboard, ...)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send one step's metrics to the trackers."""

    def end(self) -> None:
        """Flush trackers and tear down."""
