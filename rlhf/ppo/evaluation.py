"""``--do_eval``: the policy on prompts held out from training, answered greedily and scored by the run's reward.

Before the first optimizer step, every ``--eval_steps`` steps and at the end, the actor answers the
``--split_ratio`` share of the prompts that :func:`rlhf.ppo.data.hold_out_prompts` kept out of training,
by greedy decoding through the rollout's own generator (the same engine, KV cache and EOS ids; EOS held
back until ``--min_response_length`` as in the rollouts), one generation batch at a time. The run's reward
(reward model, rule, or their sum) scores each response as a rollout's is scored, before clipping and
shaping: ``eval/score`` is on the scale of the rollouts' ``reward/score``.

Greedy decoding draws no random numbers, so an evaluation changes nothing in training: the same steps
come out with or without it, and a resumed run stays bit-identical. Processes split the prompts (process
``r`` takes every world-th); the results are over all of them:

- a row in ``metrics.jsonl`` and the trackers: ``step``, ``eval/score``, ``eval/score_std``,
  ``eval/response_length``, ``eval/eos_frac`` (responses that ended with an EOS), ``eval/prompts``,
  ``eval/seconds``;
- one line per prompt in ``eval_samples.jsonl``: ``step``, ``index`` (in the held-out set), ``prompt``,
  ``response``, ``score``, ``length`` (tokens), ``ended``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rlhf.generation.base import is_eos
from rlhf.ppo.batch import SequenceBatch, left_pad
from rlhf.ppo.memory import forward_batch_size, score_in_chunks

if TYPE_CHECKING:
    from rlhf.metrics import MetricsFile
    from rlhf.ppo.loop import PPOSession

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One evaluation: the metrics row (without ``step``) and the per-prompt samples, in held-out order."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]


@torch.no_grad()
def evaluate_policy(s: PPOSession, step: int) -> Evaluation:
    """Evaluate the actor of PPO session ``s`` on ``s.eval_prompts``; ``step``: the optimizer steps taken so
    far (recorded in each sample). Every process must call it."""
    prompts, backend = s.eval_prompts, s.backend
    started = time.perf_counter()
    s.models.train(False)
    greedy = replace(s.generator.sampling, temperature=0.0, top_k=0, top_p=1.0)
    rows = list(range(backend.replica_rank, len(prompts), backend.world_size))
    generation_rows = s.args.per_device_train_batch_size * s.ppo.num_samples_per_prompt  # the engine's batch
    forward_rows = forward_batch_size(
        s.ppo.per_device_forward_batch_size, s.ppo.per_device_mini_train_batch_size
    )
    parts, texts, responses, lengths, ended = [], [], [], [], []
    for start in range(0, len(rows), generation_rows):
        chunk = rows[start : start + generation_rows]
        prompt_ids, prompt_mask = left_pad([prompts.ids[i] for i in chunk], s.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(backend.device), prompt_mask.to(backend.device)
        with backend.autocast():
            out = s.generator.generate(prompt_ids, prompt_mask, sampling=greedy)
        parts.append(SequenceBatch(
            torch.cat([prompt_ids, out.response_ids], 1),
            torch.cat([prompt_mask, out.response_mask.to(prompt_mask.dtype)], 1),
            prompt_ids.shape[1],
        ))  # fmt: skip
        n = out.response_mask.sum(1).long().tolist()
        responses += s.decode([r[:k] for r, k in zip(out.response_ids.tolist(), n)], skip_special_tokens=True)
        texts += [prompts.texts[i] for i in chunk]
        lengths += n
        ended += (is_eos(out.response_ids, s.eos_token_id) & out.response_mask.bool()).any(1).tolist()
    scores = []
    if parts:  # scored together, as a rollout's responses are (a --reward_fn sees them in one call)
        batch = SequenceBatch.concat(parts, s.pad_token_id)
        with backend.autocast():
            scores = score_in_chunks(s.scorer, batch, texts, responses, forward_rows).float().tolist()
    samples = [
        {"step": step, "index": i, "prompt": text, "response": response, "score": score, "length": n,
         "ended": end}
        for i, text, response, score, n, end in zip(rows, texts, responses, scores, lengths, ended)
    ]  # fmt: skip
    samples = gather_samples(samples, backend.world_size)
    return Evaluation(summarize(samples, time.perf_counter() - started), samples)


def gather_samples(samples: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every process's samples on every process, in held-out order (one per index)."""
    if world_size > 1 and dist.is_initialized():
        parts: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, samples)
        samples = [sample for part in parts for sample in part or []]
    return sorted(
        {sample["index"]: sample for sample in samples}.values(), key=lambda sample: sample["index"]
    )


def summarize(samples: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """The metrics row of an evaluation's samples: means over prompts, the population spread of the score."""
    n = len(samples)
    scores = [sample["score"] for sample in samples]
    mean = sum(scores) / n
    return {
        "eval/score": mean,
        "eval/score_std": math.sqrt(sum((x - mean) ** 2 for x in scores) / n),
        "eval/response_length": sum(sample["length"] for sample in samples) / n,
        "eval/eos_frac": sum(sample["ended"] for sample in samples) / n,
        "eval/prompts": n,
        "eval/seconds": seconds,
    }


def run_evaluation(s: PPOSession, step: int, metrics_file: MetricsFile, samples_file: MetricsFile) -> float:
    """Evaluate at ``step`` and record it (main process: the metrics row, the trackers, the samples, a log
    line). Returns the seconds it took, which the loop leaves out of its throughput."""
    result = evaluate_policy(s, step)
    m = result.metrics
    if s.backend.is_main:
        metrics_file.append({"step": step} | m)
        samples_file.append_rows(result.samples)
        s.backend.log(m, step)
        logger.info(
            "eval at step %d: score %.4g (std %.3g) over %d held-out prompts, length %.1f, eos %.2f (%.1f s)",
            step, m["eval/score"], m["eval/score_std"], m["eval/prompts"], m["eval/response_length"],
            m["eval/eos_frac"], m["eval/seconds"],
        )  # fmt: skip
    return m["eval/seconds"]
