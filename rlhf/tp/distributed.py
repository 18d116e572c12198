"""The process group and FairScale's model-parallel groups, under ``torchrun`` or a plain ``python``.

Every process of the job is one model-parallel rank (world size = tensor-parallel degree). On GPU the
backend is NCCL and each rank takes ``cuda:LOCAL_RANK``; on CPU it is gloo. A plain ``python`` process
becomes a world of one through a local TCP store, without touching ``os.environ`` (other libraries read
``RANK``/``WORLD_SIZE`` to decide whether they run distributed).
"""

from __future__ import annotations

import logging
import os
import socket

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_model_parallel(backend: str | None = None) -> tuple[int, int]:
    """Join (or create) the process group and the model-parallel group spanning it; (rank, world size)."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"--backend must be nccl or gloo, got {backend!r}")
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    world_size = dist.get_world_size()
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() != world_size:
            raise ConfigError("the model-parallel group is already set up with another size")
    else:
        fs_init.initialize_model_parallel(world_size)
    rank = fs_init.get_model_parallel_rank()
    if rank == 0:
        logger.info("model parallel: %d rank(s), backend %s", world_size, dist.get_backend())
    return rank, world_size


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Make every rank hold rank 0's values (e.g. sampled tokens), in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0, group=fs_init.get_model_parallel_group())
    return tensor


def shutdown() -> None:
    """Tear down the model-parallel groups and the process group (e.g. between in-process tests)."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None = None) -> float:
    """The L2 norm of all gradients of a TP model, as if it were one model; clip to ``max_norm`` if given.

    Split parameters contribute their squared norms summed over ranks; replicated ones (the same on every
    rank) count once. Every rank gets the same norm and applies the same clipping factor.
    """
    from rlhf.tp.backend import group_grad_norm
    from rlhf.tp.key_maps import is_split_parameter

    params = [p for _, p in model.named_parameters()]
    split = {id(p) for name, p in model.named_parameters() if is_split_parameter(name, model.args)}
    return group_grad_norm(params, split, max_norm)
