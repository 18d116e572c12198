"""The Accelerate backend: one process, ``torchrun`` or ``accelerate launch`` (CPU gloo or GPU NCCL).

Gradients are averaged with one flat all-reduce per optimizer step instead of wrapping models in DDP:
the PPO loop runs several forward passes (actor, critic, reference, reward) through the same frozen base
between optimizer steps, which DDP's one-forward-one-backward bookkeeping does not allow. The result is
the same as DDP's: every process steps with the mean gradient and the replicas stay identical.
"""

from __future__ import annotations

import logging
import math
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

from rlhf.backend.base import Optimizers, ParameterGroups, Schedulers
from rlhf.backend.state_files import read_trainable, write_trainable
from rlhf.backend.trackers import TrackerMethods, Trackers
from rlhf.errors import ConfigError
from rlhf.training.trainable import upcast_float16_trainable

logger = logging.getLogger(__name__)


# what `accelerate launch` sets for a DeepSpeed / FSDP config (an Accelerator built in this process with
# such a plugin sets ACCELERATE_USE_* too, but not these)
LAUNCHED_WITH = {"DEEPSPEED": "ACCELERATE_CONFIG_DS_FIELDS", "FSDP": "FSDP_VERSION"}


def sharding_engine(accelerator: Accelerator) -> str | None:
    """DEEPSPEED, FSDP or MEGATRON_LM when the launch asked for one, else None. On CPU Accelerate quietly
    falls back to plain processes, so ``accelerate launch``'s environment is read as well."""
    name = accelerator.distributed_type.name
    if name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        return name
    for engine, marker in LAUNCHED_WITH.items():
        used = os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true")
        if used and marker in os.environ:
            return engine
    return None


class AccelerateBackend(TrackerMethods):
    def __init__(
        self,
        mixed_precision: str = "no",
        timeout_s: int = 1800,
        report_to: list[str] | None = None,
        project_dir: str | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        kwargs = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU processes under torchrun need this to join a gloo group
            mixed_precision=mixed_precision,
            kwargs_handlers=kwargs,
            project_dir=project_dir,
        )
        unsupported = sharding_engine(self.accelerator)
        if unsupported:
            raise ConfigError(
                f"the Accelerate config sets distributed_type: {unsupported}, which this stage does not use "
                "(nothing would be sharded): use distributed_type: MULTI_GPU (with LoRA the trainable state is "
                "a few MB per process) or, for a model too large for one GPU, the tensor-parallel backend "
                "(python -m rlhf.tp.ppo_train)"
            )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.replica_rank = self.rank  # every process is a data-parallel replica
        # fp16 gradients underflow without loss scaling; with bf16 or fp32 the scaler is off (a no-op).
        fp16 = mixed_precision == "fp16"
        self.scaler = (
            grad_scaler if grad_scaler is not None else torch.amp.GradScaler(self.device.type, enabled=fp16)
        )
        self.trackers = Trackers(report_to or [], project_dir, self.is_main)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise RuntimeError(f"WORLD_SIZE={launched} but Accelerate joined {self.world_size} process(es)")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on this process's device; under fp16, its trainable float16 weights in float32 (the
        loss scaler refuses float16 gradients: a full-fine-tuning actor or critic copied from a float16 base
        would fail at its first step), as the SFT and reward-model stages do."""
        if self.scaler.is_enabled():
            upcast_float16_trainable(module)
        return module.to(self.device)

    def autocast(self):
        if self.accelerator.mixed_precision == "no":
            return nullcontext()
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # the loss times the fp16 loss scale (unchanged without fp16)

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
        self, optimizers: Optimizers, schedulers: Schedulers, groups: ParameterGroups, max_norm: float
    ) -> dict[str, float]:
        params = [p for group in groups.values() for p in group]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_mean([p.grad for p in params])
        for optimizer in optimizers.values():  # after the all-reduce, so every process sees the same inf
            self.scaler.unscale_(optimizer)  # true-scale gradients before clipping (no-op without fp16)
        norms = {}
        for name, group in groups.items():
            limit = max_norm if max_norm > 0 else float("inf")
            norms[name] = float(torch.nn.utils.clip_grad_norm_(group, limit))
        for name, optimizer in optimizers.items():
            if self.scaler.is_enabled() and not math.isfinite(norms.get(name, 0.0)):
                # fp16 overflow: skip this optimizer's step and its scheduler's, as Accelerate does
                if self.is_main:
                    logger.info(
                        "fp16: inf/nan %s gradients, step skipped (loss scale %g)",
                        name,
                        self.scaler.get_scale(),
                    )
            else:
                optimizer.step()
                schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # halve the scale after an overflow, grow it after a run of clean steps
        return norms

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs from the backend itself: the fp16 loss scaler ({} without fp16)."""
        return {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("grad_scaler"):  # empty when saved without fp16: keep the fresh scaler
            self.scaler.load_state_dict(state["grad_scaler"])

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def save_trainable(
        self, directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]
    ) -> None:
        """Replicated weights: one copy, written by the main process into ``directory``; the backend's own
        state (:meth:`state_dict`: the fp16 loss scaler) rides along in ``optimizer.pt``."""
        if self.is_main:
            write_trainable(directory, tensors, optimizer_state | {"backend": self.state_dict()})

    def load_trainable(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, optimizer_state = read_trainable(directory)
        self.load_state_dict(optimizer_state.pop("backend", {}))
        return tensors, optimizer_state

    def run_export(self, write: Callable[[], None]) -> None:
        """Replicated weights: the main process exports them."""
        if self.is_main:
            write()

    def end(self) -> None:
        """Flush the trackers; with several processes, wait for all and free the process group
        (Accelerate's ``end_training``), so no communication thread outlives the interpreter's shutdown."""
        self.trackers.end()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
