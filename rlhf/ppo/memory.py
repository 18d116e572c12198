"""Device memory in the PPO loop: the row chunks of the rollout's forwards, and the peak-memory reading.

The rollout's forwards without gradients — reward model, reference and old log-probs, critic values — run
on ``--per_device_forward_batch_size`` rows at a time (default: the mini-batch size), whatever the
generation batch: a rollout of 64 prompts x 8 samples is then not one 512-row forward. A rule reward
(Python on the decoded text) sees the whole rollout in one call, as before.

The peak (``torch.cuda.max_memory_allocated``, or the process's peak RSS on CPU) is logged once, at the end
of the first optimizer step, when generation, scoring and one update have all run; on GPU every
``metrics.jsonl`` row also carries it as ``memory/peak_gb``.
"""

from __future__ import annotations

import logging
import resource
import sys

import torch

from rlhf.errors import ConfigError
from rlhf.ppo.batch import SequenceBatch
from rlhf.ppo.rewards import RuleScorer, Scorer, SumScorer

logger = logging.getLogger(__name__)


def forward_batch_size(per_device_forward_batch_size: int, mini_batch_size: int) -> int:
    """Rows per rollout forward: ``--per_device_forward_batch_size``, or the mini-batch size for -1."""
    if per_device_forward_batch_size == -1:
        return mini_batch_size
    if per_device_forward_batch_size <= 0:
        raise ConfigError(
            f"--per_device_forward_batch_size must be > 0 (or -1: the mini-batch size); "
            f"got {per_device_forward_batch_size}"
        )
    return per_device_forward_batch_size


def row_chunks(n: int, size: int) -> list[torch.Tensor]:
    """Row indices 0..n-1 in consecutive chunks of at most ``size`` (the last may be shorter)."""
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def score_in_chunks(
    scorer: Scorer, batch: SequenceBatch, prompts: list[str], responses: list[str], rows: int
) -> torch.Tensor:
    """``scorer.score`` of every sequence [N], a model scorer called on ``rows`` sequences at a time.

    Rule scorers get all N responses in one call (no device memory to save, and a rule may look at the
    whole batch); a sum of scorers chunks each of its model parts. Scores are per sequence, so chunking
    does not change them.
    """
    n = batch.input_ids.shape[0]
    if isinstance(scorer, SumScorer):
        return sum(score_in_chunks(part, batch, prompts, responses, rows) for part in scorer.scorers)
    if isinstance(scorer, RuleScorer) or n <= rows:
        return scorer.score(batch, prompts, responses)
    scores = []
    for index in row_chunks(n, rows):
        start, end = int(index[0]), int(index[-1]) + 1
        scores.append(
            scorer.score(
                batch.select(index.to(batch.input_ids.device)), prompts[start:end], responses[start:end]
            )
        )
    return torch.cat(scores)


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (2**30 bytes). On Linux ``VmHWM`` of
    ``/proc/self/status``: ``ru_maxrss`` keeps the parent's peak across fork and exec, so a process started
    by a large one (a test runner, a benchmark's driver) would report at least the parent's. Elsewhere
    ``ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far in GB (2**30 bytes): CUDA max allocated on a GPU, else the peak
    resident set size (:func:`peak_rss_gb`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """``{"memory/peak_gb": ...}`` on a GPU (this process's max allocated so far), nothing on CPU."""
    return {"memory/peak_gb": peak_memory_gb(device)} if device.type == "cuda" else {}


def log_peak_memory(device: torch.device, step: int) -> None:
    """The one log line after the first optimizer step: peak memory so far and what it measures."""
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    logger.info("peak memory after optimizer step %d: %.2f GB (%s)", step, peak_memory_gb(device), what)
