"""Token sequences of the training stages: a response ends with EOS, and a pair fits a length budget.

Both the SFT and the reward-model stages cut over-long examples the same way:

1. a response longer than ``max_response`` tokens is cut on the right (its tail, and its EOS, are lost);
2. the prompt is then cut from the left, so the part of the prompt closest to the response survives; a
   leading BOS token is kept in front of what remains.

Real Anthropic-HH transcripts need both rules: long multi-turn prompts, and some responses that alone are
longer than the budget.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf.errors import DataError

logger = logging.getLogger(__name__)


def encode_response(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a response followed by the tokenizer's EOS id (no BOS).

    The EOS is appended by id, never found through the pad id, so it is there (and learned, and scored)
    also when the tokenizer pads with its EOS token.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to end responses with")
    return ids + [tokenizer.eos_token_id]


def fit_to_length(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    max_response: int | None = None,
    bos_id: int | None = None,
) -> tuple[list[int], list[int], bool]:
    """Cut ``prompt_ids + response_ids`` to at most ``max_length`` tokens; return (prompt, response, cut).

    ``max_response`` (default ``max_length - 1``) caps the response alone, leaving room for at least one
    prompt token, after the BOS when the prompt starts with ``bos_id`` (and ``max_length`` > 2): a cut
    prompt keeps its BOS. ``cut`` is True when anything was removed.

    >>> fit_to_length([1, 5, 6, 7], [8, 9, 2], max_length=5, bos_id=1)
    ([1, 7], [8, 9, 2], True)
    >>> fit_to_length([1, 5], [8, 9, 10, 11, 2], max_length=4, max_response=3)
    ([5], [8, 9, 10], True)
    >>> fit_to_length([1, 5, 6], [8, 9, 10, 11, 2], max_length=4, bos_id=1)
    ([1, 6], [8, 9], True)
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    starts_with_bos = (
        bos_id is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos_id and max_length > 2
    )
    room_for_prompt = 2 if starts_with_bos else 1
    cap = max_length - room_for_prompt
    cap = cap if max_response is None else min(max_response, cap)
    cut = len(response_ids) > cap
    response = response_ids[:cap]
    room = max_length - len(response)
    if len(prompt_ids) <= room:
        return list(prompt_ids), response, cut
    keep_bos = bos_id is not None and prompt_ids and prompt_ids[0] == bos_id and room >= 2
    if keep_bos:
        prompt = [bos_id] + prompt_ids[len(prompt_ids) - (room - 1) :]
    else:
        prompt = prompt_ids[len(prompt_ids) - room :]
    return prompt, response, True


def warn_beyond_context(longest: int, context: int | None, flag: str, limit: int) -> None:
    """One warning line when the longest sequence (``longest`` tokens, allowed by ``flag``'s value
    ``limit``) is longer than the model's ``max_position_embeddings`` ``context``.

    Every model type the stages load (llama, mistral, mixtral, qwen2) has rotary positions: it runs beyond
    that length, without an error, but on positions it was never trained on, so training there teaches
    and measures little; a model with learned absolute positions would fail with an index error instead.
    """
    if context is None or longest <= context:
        return
    logger.warning(
        "the longest sequence is %d tokens (%s %d), more than the model's max_position_embeddings %d: the "
        "model runs there, on positions it was never trained on, and its quality degrades; lower %s to %d",
        longest, flag, limit, context, flag, context,
    )  # fmt: skip
