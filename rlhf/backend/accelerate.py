"""The Accelerate backend: one process, ``torchrun`` or ``accelerate launch`` (CPU gloo or GPU NCCL).

Gradients are averaged with one flat all-reduce per optimizer step instead of wrapping models in DDP:
the PPO loop runs several forward passes (actor, critic, reference, reward) through the same frozen base
between optimizer steps, which DDP's one-forward-one-backward bookkeeping does not allow. The result is
the same as DDP's: every process steps with the mean gradient and the replicas stay identical.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from rlhf.backend.state_files import read_trainable, write_trainable
from rlhf.backend.trackers import Trackers

logger = logging.getLogger(__name__)


class AccelerateBackend:
    def __init__(
        self,
        mixed_precision: str = "no",
        timeout_s: int = 1800,
        report_to: list[str] | None = None,
        project_dir: str | None = None,
    ) -> None:
        kwargs = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU processes under torchrun need this to join a gloo group
            mixed_precision=mixed_precision,
            kwargs_handlers=kwargs,
            project_dir=project_dir,
        )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.trackers = Trackers(report_to or [], project_dir, self.is_main)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise RuntimeError(f"WORLD_SIZE={launched} but Accelerate joined {self.world_size} process(es)")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def autocast(self):
        if self.accelerator.mixed_precision == "no":
            return nullcontext()
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        if self.world_size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        parameter_groups: dict[str, list[torch.nn.Parameter]],
        max_grad_norm: float,
    ) -> dict[str, float]:
        params = [p for group in parameter_groups.values() for p in group]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_mean([p.grad for p in params])
        norms = {}
        for name, group in parameter_groups.items():
            limit = max_grad_norm if max_grad_norm > 0 else float("inf")
            norms[name] = float(torch.nn.utils.clip_grad_norm_(group, limit))
        for name, optimizer in optimizers.items():
            optimizer.step()
            schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
        return norms

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def save_trainable(
        self, directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]
    ) -> None:
        """Replicated weights: one copy, written by the main process into ``directory``."""
        if self.is_main:
            write_trainable(directory, tensors, optimizer_state)

    def load_trainable(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return read_trainable(directory)

    def run_export(self, write: Callable[[], None]) -> None:
        """Replicated weights: the main process exports them."""
        if self.is_main:
            write()

    def init_trackers(self, project: str, config: dict[str, Any]) -> None:
        self.trackers.start(project, config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackers.log(metrics, step)

    def end(self) -> None:
        self.trackers.end()
