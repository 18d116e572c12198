"""The process group and FairScale's model-parallel groups, under ``torchrun`` or a plain ``python``.

Every process of the job is one model-parallel rank (world size = tensor-parallel degree). On GPU the
backend is NCCL and each rank takes ``cuda:LOCAL_RANK``; on CPU it is gloo. A plain ``python`` process
becomes a world of one through a local TCP store, without touching ``os.environ`` (other libraries read
``RANK``/``WORLD_SIZE`` to decide whether they run distributed).

Leaving: every command ends inside :func:`process_group_scope`, which tears the groups down through
:func:`shutdown` while the interpreter is still fully alive. Gloo runs each collective on a worker thread
of its process group, and that thread drops its last reference to the collective's tensors afterwards,
which takes the GIL; if the interpreter is already finalizing by then, the thread is killed inside a C++
destructor and the process dies with SIGABRT ("terminate called without an active exception"). Under
load that happened to the last all-gather before exit. Destroying every process group object first
(torch releases the GIL while a process group's destructor joins its worker threads) leaves no such
thread behind.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

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


def shutdown(wait_for_peers: bool = True) -> None:
    """Tear down FairScale's groups and the process group, and free them now (not at interpreter exit).

    ``wait_for_peers`` first waits at a barrier until every rank got here, so no rank leaves while a peer
    still talks to it; pass False on an error path, where a peer may never arrive. Safe to call when
    nothing is initialised (e.g. between in-process tests).
    """
    if wait_for_peers:
        barrier()
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()  # FairScale's module globals hold the group objects
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # group objects caught in reference cycles: their destructors join gloo's threads now


@contextmanager
def process_group_scope() -> Iterator[None]:
    """Run a command; at its end tear down the process group if the command created it.

    A group that existed before (a caller running several commands in one job, a test) is left alone.
    On success every rank waits for the others first; on an error it leaves at once.
    """
    owned = not dist.is_initialized()
    try:
        yield
    except BaseException:
        if owned:
            shutdown(wait_for_peers=False)
        raise
    if owned:
        shutdown()


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None = None) -> float:
    """The L2 norm of all gradients of a TP model, as if it were one model; clip to ``max_norm`` if given.

    Split parameters contribute their squared norms summed over ranks; replicated ones count once, after
    every rank took rank 0's gradients of them (:func:`rlhf.tp.backend.broadcast_replicated_grads`).
    Every rank gets the same norm and applies the same clipping factor.
    """
    from rlhf.tp.backend import group_grad_norm
    from rlhf.tp.key_maps import is_split_parameter

    params = [p for _, p in model.named_parameters()]
    split = {id(p) for name, p in model.named_parameters() if is_split_parameter(name, model.args)}
    return group_grad_norm(params, split, max_norm)
