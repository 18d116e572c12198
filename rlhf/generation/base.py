"""The generation interface and the sampling settings every engine honours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (``--max_response_length``, ``--temperature``, ...).

    ``temperature <= 0`` means greedy decoding; ``num_beams > 1`` (beam search) only HF generate does.
    """

    max_new_tokens: int
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    eos_token_id: int | None = None
    pad_token_id: int = 0
    num_beams: int = 1


@dataclass
class Generation:
    """Responses to a batch of prompts.

    response_ids: [B, R] right-padded with the pad id after the first EOS (R <= max_new_tokens);
    response_mask: [B, R] long, 1 up to and including the first EOS;
    logprobs: [B, R] log softmax(logits / temperature) of each sampled token under the model that sampled
    (before top-k/top-p), 0 after the mask, when the engine computes them, else ``None``. The PPO loop
    takes them as the old log-probs; without them it recomputes those with an eval-mode forward.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None


class Generator(Protocol):
    """What the PPO loop asks for rollouts: :class:`rlhf.generation.hf.HFGenerator` (HF ``generate``) or
    :class:`rlhf.generation.engine.EngineGenerator` (the static-cache engine); see
    :func:`rlhf.generation.build.build_generator`."""

    def prepare(self) -> None:
        """Allocate what generation needs up front (the engine's static KV cache) and log its size; called
        once before the first rollout, under the backend's autocast. A no-op for HF ``generate``."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Generation:
        """Sample one response per prompt. prompt_ids, prompt_mask: [B, P], left-padded."""


def response_mask_after_eos(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it. [B, R] -> [B, R] long.

    The mask comes from the EOS position, never from pad ids: the pad token may be the EOS token.
    """
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()
