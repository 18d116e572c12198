"""The generation interface and the sampling settings every engine honours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (``--max_response_length``, ``--temperature``, ...).

    ``temperature <= 0`` means greedy decoding; ``num_beams > 1`` (beam search) only HF generate does.
    ``eos_token_id``: one id or several (a chat model's end-of-turn tokens beside the tokenizer's EOS, as
    its ``generation_config.json`` lists them); a response ends at the first of any.
    """

    max_new_tokens: int
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    eos_token_id: int | tuple[int, ...] | None = None
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

    sampling: SamplingConfig  # what it samples with (the PPO loop reads its EOS ids)

    def prepare(self) -> None:
        """Allocate what generation needs up front (the engine's static KV cache) and log its size; called
        once before the first rollout, under the backend's autocast. A no-op for HF ``generate``."""

    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig | None = None
    ) -> Generation:
        """Sample one response per prompt. prompt_ids, prompt_mask: [B, P], left-padded; ``sampling``: other
        settings than :attr:`sampling` for this call (greedy, for an evaluation)."""


def eos_ids(eos_token_id: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    """The EOS ids as a tuple: ``None`` -> ``()``, one id -> ``(id,)``, several kept in order, repeats dropped."""
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def stop_ids(*sources: int | tuple[int, ...] | list[int] | None) -> int | tuple[int, ...] | None:
    """The EOS ids of every source (the tokenizer's EOS, a ``generation_config.json``'s ``eos_token_id``) in
    order, repeats dropped, as :attr:`SamplingConfig.eos_token_id` takes them: one id, several, or ``None``."""
    ids = eos_ids([i for source in sources for i in eos_ids(source)])
    return (ids[0] if len(ids) == 1 else ids) if ids else None


def is_eos(tokens: torch.Tensor, eos_token_id: int | tuple[int, ...] | None) -> torch.Tensor:
    """Bool tensor of ``tokens``' shape: True where a token is one of the EOS ids (none: all False)."""
    # one comparison per id, with the ids as kernel arguments: a tensor of them (for torch.isin) would be a
    # host-to-device copy, which on a GPU waits for the device, at every decode step of a multi-EOS model
    ids = eos_ids(eos_token_id)
    if not ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ended = tokens == ids[0]
    for token_id in ids[1:]:
        ended |= tokens == token_id
    return ended


def response_mask_after_eos(
    response_ids: torch.Tensor, eos_token_id: int | tuple[int, ...] | None
) -> torch.Tensor:
    """1 up to and including the first EOS (any of the EOS ids) of each row, 0 after it. [B, R] -> [B, R] long.

    The mask comes from the EOS position, never from pad ids: the pad token may be the EOS token.
    """
    if not eos_ids(eos_token_id):
        return torch.ones_like(response_ids)
    is_end = is_eos(response_ids, eos_token_id).long()
    eos_before = is_end.cumsum(-1) - is_end  # EOS tokens strictly before each position
    return (eos_before == 0).long()
