"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, model state), live weights guarded.

A graph records the kernels of one decode step (one token per row) reading fixed input buffers (tokens,
positions, write slot) and the weights where they were at capture. Replaying it costs one launch instead of
hundreds, which is what makes decoding GPU-bound. Three rules keep it honest:

- **Live weights.** An optimizer step updates parameters in place, at the same addresses: the next replay
  sees it. A tensor moved or re-allocated (``param.data = ...``, ``.to()``, ``load_state_dict(assign=True)``)
  is not seen by the graph, so :class:`WeightGuard` records the address of every parameter and buffer at
  the first capture and :meth:`DecodeGraphs.prepare` raises :class:`StaleGraphError` before any replay
  once one moved: never sample from stale weights.
- **Model state.** A graph bakes in which adapters were active, train/eval mode and autocast. The graphs
  are keyed by the model side's :meth:`~rlhf.generation.decoder.Decoder.state_key`, so switching the
  adapter captures a new graph instead of silently replaying the actor's.
- **Buckets.** Rows are padded up to a bucket (1, 2, 4, 8, then multiples of 16) so a handful of graphs
  serve every batch size; all graphs share one memory pool.

The CUDA path (:func:`capture_cuda_graph`) ran on an H200 (``tests/test_generation_gpu.py``); everything
else here also runs on CPU in the tests, with a capture that re-runs the step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor]]


class StaleGraphError(RuntimeError):
    """A parameter or buffer moved since the CUDA graphs were captured: they would read old weights."""


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 32, 48, ... up to and including ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``rows``."""
    return next(b for b in buckets if b >= rows)


class WeightGuard:
    """The addresses of every parameter and buffer of ``module`` (by name), to compare later."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.addresses = self._addresses()

    def _addresses(self) -> dict[str, tuple[int, torch.dtype, torch.Size]]:
        tensors = list(self.module.named_parameters()) + list(self.module.named_buffers())
        return {name: (t.data_ptr(), t.dtype, t.shape) for name, t in tensors}

    def check(self) -> None:
        """Raise :class:`StaleGraphError` if a tensor was added, removed, moved or re-allocated."""
        now = self._addresses()
        if now == self.addresses:
            return
        changed = sorted(set(now) ^ set(self.addresses)) or sorted(
            name for name in now if now[name] != self.addresses[name]
        )
        raise StaleGraphError(
            f"{len(changed)} weight tensor(s) of the generation model changed address since the decode "
            f"CUDA graphs were captured (first: {changed[0]}); the graphs would read the old values. "
            "Update weights in place (param.data.copy_(...), optimizer steps) or build a new generator."
        )


def capture_cuda_graph(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn`` (after warm-up runs on a side stream) as a CUDA graph: (replay, its output tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # cuBLAS handles, lazy inits: never inside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    finally:  # a capture that fails can leave its side stream current (torch.cuda.graph's exit raises first)
        torch.cuda.set_stream(before)
    return graph.replay, out


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


class DecodeGraphs:
    """Graphs of ``step(batch)`` (a decode step over the engine's input buffers' first ``batch`` rows).

    ``capture`` defaults to :func:`capture_cuda_graph`; the tests pass one that re-runs the step, which
    exercises the buffers, buckets, keys and guard on CPU.
    """

    def __init__(
        self, step: Callable[[int], torch.Tensor], module: nn.Module, capture: Capture | None = None
    ) -> None:
        self.step = step
        self.module = module
        self.capture = capture or capture_cuda_graph
        self.graphs: dict[tuple, tuple[Callable[[], None], torch.Tensor]] = {}
        self.guard: WeightGuard | None = None
        self.pool = None
        self.capture_seconds = 0.0

    def prepare(self, batch: int, state_key: tuple, device: torch.device) -> tuple:
        """Check the weights, capture the graph for (``batch``, state) if new; the key to :meth:`run`.

        Call before the cache is reset for a generation: warm-up and capture write into the cache.
        """
        if self.guard is not None:
            self.guard.check()
        key = (batch, state_key, _autocast_state(device.type))
        if key in self.graphs:
            return key
        started = time.perf_counter()
        if self.pool is None and device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        enabled, dtype = key[2]
        # autocast's weight-cast cache must stay off while capturing (the casts become graph kernels)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False)
        with autocast:
            self.graphs[key] = self.capture(lambda: self.step(batch), self.pool)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if self.guard is None:
            self.guard = WeightGuard(self.module)
        elapsed = time.perf_counter() - started
        self.capture_seconds += elapsed
        logger.info(
            "captured the decode step for %d rows (%d graph(s), %.2f s)", batch, len(self.graphs), elapsed
        )
        return key

    def run(self, key: tuple) -> torch.Tensor:
        """Replay the graph of ``key``; its logits [batch, V] (overwritten by the next replay)."""
        replay, out = self.graphs[key]
        replay()
        return out

    def clear(self) -> None:
        """Forget every graph (the cache they write into was re-allocated)."""
        self.graphs.clear()
        self.guard = None
