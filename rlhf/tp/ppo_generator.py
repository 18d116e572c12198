"""The PPO loop's generation seam on the tensor-parallel model (the backend is :mod:`rlhf.tp.backend`).

:class:`TPGenerator` implements :class:`rlhf.generation.Generator` with :func:`rlhf.tp.generation.generate`
(KV cache; sampled tokens broadcast from rank 0, so the ranks never diverge).
"""

from __future__ import annotations

import logging

import torch

from rlhf.generation.base import Generation, SamplingConfig
from rlhf.tp.generation import generate
from rlhf.tp.model import Transformer

logger = logging.getLogger(__name__)


class _NoEarlyEOS(torch.nn.Module):
    """The actor with EOS forbidden until ``min_new`` tokens were generated (``--min_response_length``)."""

    def __init__(self, model: Transformer, eos_id: int | None, min_new: int, prompt_len: int) -> None:
        super().__init__()
        self.model, self.args = model, model.args
        self.eos_id, self.min_new, self.prompt_len = eos_id, min_new, prompt_len

    def forward(self, tokens, attention_mask=None, cache=None, start_pos=0) -> torch.Tensor:
        logits = self.model(tokens, attention_mask, cache=cache, start_pos=start_pos)
        generated = start_pos + tokens.shape[1] - self.prompt_len  # tokens before the one these logits pick
        if self.eos_id is not None and generated < self.min_new:
            logits[:, -1, self.eos_id] = float("-inf")
        return logits


class TPGenerator:
    """``generate(prompt_ids, prompt_mask)`` on the TP actor; responses right-padded after the EOS."""

    def __init__(self, generation_model, sampling: SamplingConfig) -> None:
        self.generation_model = generation_model  # context manager yielding the actor
        self.sampling = sampling

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Generation:
        cfg = self.sampling
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        with self.generation_model() as actor:
            out = generate(
                _NoEarlyEOS(actor, cfg.eos_token_id, cfg.min_new_tokens, prompt_ids.shape[1]),
                prompts, max_gen_len=cfg.max_new_tokens, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            )  # fmt: skip
        rows = []
        for tokens in out.tokens:  # EOS is not in ``tokens``: a row shorter than the limit stopped at EOS
            ended = len(tokens) < cfg.max_new_tokens and cfg.eos_token_id is not None
            rows.append(tokens + [cfg.eos_token_id] if ended else tokens)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return Generation(ids.to(prompt_ids.device), mask.to(prompt_ids.device))
