"""Batched generation on the TP model: left padding, a KV cache allocated per call, greedy or sampled.

Every rank runs the same loop on the same (all-gathered) logits; sampled tokens are broadcast from rank 0
so the ranks never diverge. A row stops at EOS (not included in its output) or after ``max_gen_len`` tokens;
the loop ends when every row has stopped (or when ``stop_fn`` says a row is done, e.g. on stop strings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.tp.distributed import broadcast_from_main
from rlhf.tp.model import KVCache, Transformer


@dataclass
class Generation:
    """One row per prompt: generated token ids (EOS excluded) and their log-probabilities under the model."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as (B, P) ids and a (B, P) mask of real tokens, padded on the left."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = 1
    return tokens, mask


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int = 0,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,): argmax when ``temperature`` is 0, else sampling from the
    ``top_k`` most likely tokens (0 = all; ties with the k-th stay), then the nucleus ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = F.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_gen_len: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
) -> Generation:
    """Continue every prompt (token ids, BOS included as the tokenizer adds it) by up to ``max_gen_len`` tokens.

    ``stop_fn(row, tokens_so_far)`` may end a row early (checked after each new token).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = tokens.shape
    cache = KVCache(model.args, batch, prompt_len + max_gen_len, dtype, device)
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    out_logprobs: list[list[float]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_input, start = tokens, 0
    for _ in range(max_gen_len):
        logits = model(step_input, mask, cache=cache, start_pos=start)[:, -1].float()  # (B, V)
        next_tokens = broadcast_from_main(sample_next(logits, temperature, top_p, generator, top_k))
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, next_tokens[:, None]).squeeze(-1)
        start += step_input.shape[1]
        for row, (token, logprob) in enumerate(zip(next_tokens.tolist(), logprobs.tolist())):
            if done[row]:
                continue
            if token == eos_id:
                done[row] = True
                continue
            out_tokens[row].append(token)
            out_logprobs[row].append(logprob)
            if stop_fn is not None and stop_fn(row, out_tokens[row]):
                done[row] = True
        if all(done):
            break
        step_input = next_tokens[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
    return Generation(out_tokens, out_logprobs)
