"""Reward sources: the reward adapter on the shared base, a separate reward model, or a rule function.

Each scorer maps a batch of finished rollouts to one score per sequence; several are summed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf.data.templates import encode_rendered_prompt, render_chat_prompt
from rlhf.errors import ConfigError
from rlhf.generation.base import is_eos
from rlhf.ppo.batch import SequenceBatch, left_pad
from rlhf.ppo.policy_interface import PolicyModels
from rlhf.reward.model import float32_last_token_scores

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]


def shaped_scores(
    scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None, clip: float
) -> torch.Tensor:
    """The scores the rewards are built from: ``missing_eos_penalty`` subtracted from each response that
    did not end with EOS within the length limit (``--missing_eos_penalty``, as TRL's), then clipped to
    [-clip, clip] (``--reward_score_clip``). scores [N] float, ended [N] bool -> [N]; a new tensor (no
    boolean-mask indexing, which waits for a GPU)."""
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    return scores.clamp(-clip, clip)


def ending_as_trained(
    batch: SequenceBatch, policy_eos: tuple[int, ...], reward_eos: int | None
) -> SequenceBatch:
    """``batch`` with each response that ended on another of the rollout's EOS ids (``policy_eos``: the
    tokenizer's and ``generation_config.json``'s, e.g. Llama-3's ``<|eot_id|>`` beside ``<|end_of_text|>``)
    ending on ``reward_eos`` instead: the token the reward stage appended to every side it trained on, and
    where it reads the score. No change when the rollout has no other EOS id (no host sync either way)."""
    others = tuple(i for i in policy_eos if i != reward_eos)
    if reward_eos is None or not others:
        return batch
    last = batch.last_token_positions[:, None]  # [B, 1]
    tokens = batch.input_ids.gather(1, last)
    has_response = batch.response_mask.sum(1, keepdim=True) > 0  # else the last token is the prompt's
    swap = is_eos(tokens, others) & has_response
    ids = batch.input_ids.scatter(1, last, torch.where(swap, torch.full_like(tokens, reward_eos), tokens))
    return SequenceBatch(ids, batch.attention_mask, batch.prompt_len)


class Scorer(Protocol):
    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """One score per sequence: [B] float32 on the batch's device."""


class AdapterScorer:
    """The reward adapter and score head living on the shared base (``PolicyModels.reward_scores``), read at
    the response's last token, an EOS of the rollout's mapped to the one it was trained on
    (:func:`ending_as_trained`; ``policy_eos`` and ``reward_eos`` set by the session)."""

    def __init__(self, models: PolicyModels) -> None:
        self.models = models
        self.policy_eos: tuple[int, ...] = ()
        self.reward_eos: int | None = None  # None: the session's tokenizer's EOS

    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.models.reward_scores(ending_as_trained(batch, self.policy_eos, self.reward_eos)).float()


class SequenceClassifierScorer:
    """A separate frozen ``AutoModelForSequenceClassification`` (``--reward_model_path``, or a reward
    adapter trained on another base), read at the last real token as the reward stage trains it
    (:func:`rlhf.reward.model.sequence_rewards`; HF's own pooling would read the token before an EOS that is
    also the pad token). With its own tokenizer (``tokenizer`` given) the prompt and response text is
    re-tokenized, and its EOS appended by id where the response ended on one of ``policy_eos`` (the
    rollout's EOS ids, set by the session): a response cut at ``--max_response_length`` is read at its last
    token, as the reward model sharing the policy's vocabulary reads it. A chat prompt (its rendered text a
    key of ``chats``) is rendered again with that tokenizer's own chat template, as the reward stage
    rendered its pairs; other prompts (Alpaca, verbatim) are the same text for both. Sharing the vocabulary,
    a response that ended on another of the rollout's EOS ids ends on ``reward_eos`` (its tokenizer's)
    instead (:func:`ending_as_trained`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        tokenizer: Any = None,
        reward_eos: int | None = None,
        chats: dict[str, list[dict[str, str]]] | None = None,
    ) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = device
        self.policy_eos: tuple[int, ...] = ()  # empty: every response is taken as ended
        self.reward_eos = reward_eos
        self.chats = chats or {}

    def _prompt_ids(self, text: str) -> list[int]:
        """A prompt in this reward model's tokenizer: a chat rendered with its template, else the text (the
        BOS once: a template may write it)."""
        if text in self.chats:
            text = render_chat_prompt(self.chats[text], self.tokenizer)
        return encode_rendered_prompt(text, self.tokenizer)

    def _ended(self, batch: SequenceBatch) -> list[bool]:
        """Per row: whether the response ends on one of ``policy_eos``."""
        if not self.policy_eos:
            return [True] * batch.input_ids.shape[0]
        lengths = batch.response_mask.sum(1).long()
        last = batch.response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        return (is_eos(last, self.policy_eos) & (lengths > 0)).tolist()

    @torch.no_grad()
    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            batch = ending_as_trained(batch, self.policy_eos, self.reward_eos)
            ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
        else:
            eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            rows = [
                self._prompt_ids(p)
                + self.tokenizer(r, add_special_tokens=False)["input_ids"]
                + (eos if ended else [])
                for p, r, ended in zip(prompts, responses, self._ended(batch))
            ]
            seqs = SequenceBatch(*left_pad(rows, self.tokenizer.pad_token_id or 0), prompt_len=0)
            ids, mask, positions = seqs.input_ids, seqs.attention_mask, seqs.position_ids
        return float32_last_token_scores(
            self.model,
            mask.to(self.device),
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
        )


class RuleScorer:
    """A Python function ``fn(prompts, responses) -> list[float]`` on the decoded text."""

    def __init__(self, fn: RewardFn, spec: str) -> None:
        self.fn = fn
        self.spec = spec

    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        values = reward_values(self.fn(prompts, responses), len(responses), self.spec)
        return torch.tensor(values, dtype=torch.float32, device=batch.input_ids.device)


def reward_values(returned: Any, count: int, spec: str) -> list[float]:
    """What a ``--reward_fn`` returned -> ``count`` floats, or a ConfigError naming the flag and the value.

    Accepted: a list, tuple, array or 1-d tensor of ``count`` numbers (ints, floats, bools, numpy or 0-d
    torch scalars). Rejected: ``None``, a single number, a string, a mapping, a wrong count, an entry
    that is not a number.
    """
    expected = f"expected a list of {count} floats, one per response"
    if isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
        raise ConfigError(f"--reward_fn {spec} returned {_describe(returned)}; {expected}")
    if isinstance(returned, torch.Tensor) and returned.dim() != 1:
        raise ConfigError(f"--reward_fn {spec} returned a tensor of shape {list(returned.shape)}; {expected}")
    if len(returned) != count:
        raise ConfigError(
            f"--reward_fn {spec} returned {len(returned)} scores for {count} responses; {expected}"
        )
    values = []
    for i, value in enumerate(returned):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            values.append(float(value))
        except (TypeError, ValueError):
            raise ConfigError(
                f"--reward_fn {spec} returned {_describe(value)} at index {i}; {expected}"
            ) from None
    return values


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class SumScorer:
    def __init__(self, scorers: list[Scorer]) -> None:
        self.scorers = scorers

    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return sum(s.score(batch, prompts, responses) for s in self.scorers)


def load_reward_fn(spec: str) -> RewardFn:
    """``path/to/file.py:fn`` or ``package.module:fn`` -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"--reward_fn {spec!r}: expected 'path/to/file.py:function' or 'module:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"--reward_fn {spec!r}: no such file {target}")
            module_spec = importlib.util.spec_from_file_location(f"reward_fn_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(f"--reward_fn {spec!r}: cannot import {target} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward_fn {spec!r}: {target} has no function {name!r}")
    return fn
