"""The tensor-parallel backend: :class:`rlhf.backend.Backend` for ``torchrun`` processes that are the
model-parallel ranks of **one** model replica.

Every process runs the same loop on the same data (same seed, same batches, same shuffles) and holds its
slice of each weight. Hence

- ``world_size`` is 1 and ``replica_rank`` 0 (one data-parallel replica: sample counts are not
  multiplied by the TP degree, every rank reads the same data), ``rank`` is the model-parallel rank and
  ``is_main`` is rank 0;
- ``prepare(model)`` places a TP model on this rank's device and records which of its parameters are
  split over the ranks (the rest are replicated);
- ``step`` gives every rank rank 0's gradients of the replicated parameters (so they cannot drift apart),
  clips each parameter group by its norm over the whole model (split parameters' squared norms summed
  over ranks, replicated ones counted once), then steps every optimizer and scheduler;
- ``mean``/``gather``/``reduce_sum`` are identities (every rank already holds the same values);
- the trainable state is sharded: each rank saves and loads its own ``trainable.safetensors`` and
  ``optimizer.pt`` in the checkpoint's ``rank_K/``, and exports run on every rank (they are collective:
  each rank writes its shard);
- trackers (``report_to``) run on rank 0, as under Accelerate (:class:`rlhf.backend.trackers.Trackers`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from rlhf.backend.base import Optimizers, ParameterGroups, Schedulers
from rlhf.backend.state_files import rank_dir, read_trainable, write_trainable
from rlhf.backend.trackers import TrackerMethods, Trackers
from rlhf.tp.distributed import barrier, device
from rlhf.tp.key_maps import is_split_parameter

logger = logging.getLogger(__name__)


def broadcast_replicated_grads(grads: list[torch.Tensor]) -> None:
    """Give every model-parallel rank rank 0's gradients of the replicated parameters, in place.

    Every rank computes them from the same (all-reduced) activations, so they agree as long as the
    kernels are deterministic; a non-deterministic GPU kernel (atomics in a reduction) can leave them a
    few ulps apart, and then the replicated weights (norms, a column layer's LoRA A, a row layer's LoRA B,
    ``v_head``) would drift apart step by step. One broadcast per dtype makes them bit-identical; with
    identical gradients it changes nothing.
    """
    if not grads or not dist.is_initialized() or fs_init.get_model_parallel_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(same)
        dist.broadcast(
            flat, src=fs_init.get_model_parallel_src_rank(), group=fs_init.get_model_parallel_group()
        )
        for grad, synced in zip(same, torch._utils._unflatten_dense_tensors(flat, same)):
            grad.copy_(synced)


def group_grad_norm(params: list[torch.nn.Parameter], split: set[int], max_norm: float | None) -> float:
    """L2 norm of the gradients of ``params`` as if the TP model were one model; clip to ``max_norm``.

    ``split`` holds the ``id`` of every parameter sharded over the ranks: their squared norms are summed
    over the model-parallel group; replicated ones count once, after :func:`broadcast_replicated_grads`
    made them the same on every rank. Every rank gets the same norm and applies the same factor.
    Parameters without a gradient are skipped.
    """
    grads = [(id(p), p.grad) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    broadcast_replicated_grads([grad for key, grad in grads if key not in split])
    split_sq = torch.zeros((), device=grads[0][1].device, dtype=torch.float32)
    replicated_sq = torch.zeros_like(split_sq)
    for key, grad in grads:
        squared = grad.detach().float().pow(2).sum()
        if key in split:
            split_sq += squared
        else:
            replicated_sq += squared
    if dist.is_initialized() and fs_init.get_model_parallel_world_size() > 1:
        dist.all_reduce(split_sq, group=fs_init.get_model_parallel_group())
    total = (split_sq + replicated_sq).sqrt()
    if max_norm is not None and max_norm > 0:
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, grad in grads:
            grad.mul_(factor.to(grad.dtype))
    return float(total)


class TPBackend(TrackerMethods):
    """See the module docstring."""

    world_size = 1

    def __init__(self, rank: int, report_to: list[str] | None = None, project_dir: str | None = None) -> None:
        self.rank = rank
        self.replica_rank = 0  # all ranks are one replica: same data, same sampling seed
        self.device = device()
        self._split: set[int] = set()  # ids of parameters sharded over the ranks
        self._prepared: set[int] = set()  # ids of every parameter of a prepared model
        self.trackers = Trackers(report_to or [], project_dir, self.is_main)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a TP model (anything with ``.args: ModelArgs``) to this rank's device and remember which
        of its parameters are split."""
        module = module.to(self.device)
        args = getattr(module, "args", None)
        if args is not None:
            self._split |= {id(p) for n, p in module.named_parameters() if is_split_parameter(n, args)}
        self._prepared |= {id(p) for p in module.parameters()}
        return module

    def autocast(self):
        return nullcontext()  # the TP models hold their dtype (--dtype) themselves

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(
        self, optimizers: Optimizers, schedulers: Schedulers, groups: ParameterGroups, max_norm: float
    ) -> dict[str, float]:
        """Clip each group by its whole-model norm (see :func:`group_grad_norm`), step, zero. Every
        parameter must belong to a model given to :meth:`prepare` (else its split is unknown)."""
        if any(id(p) not in self._prepared for group in groups.values() for p in group):
            raise RuntimeError("TPBackend.step: a parameter of a model not given to prepare()")
        norms = {
            name: group_grad_norm(group, self._split, max_norm if max_norm > 0 else None)
            for name, group in groups.items()
        }
        for name, optimizer in optimizers.items():
            optimizer.step()
            schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
        return norms

    def loss_scale(self) -> float | None:
        return None  # no fp16 (refused): nothing to scale

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # one replica: every rank already holds the same values

    def barrier(self) -> None:
        barrier()

    def save_trainable(
        self, directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]
    ) -> None:
        """Sharded weights: every rank writes its own slice into ``directory/rank_K/``."""
        write_trainable(rank_dir(directory, self.rank), tensors, optimizer_state)

    def load_trainable(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return read_trainable(rank_dir(directory, self.rank))

    def run_export(self, write: Callable[[], None]) -> None:
        """Sharded weights: the export is collective, every rank writes its shard."""
        write()

    def end(self) -> None:
        self.trackers.end()
        barrier()
