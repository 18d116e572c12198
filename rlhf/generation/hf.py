"""Hugging Face ``generate`` behind the :class:`rlhf.generation.Generator` interface."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf.generation.base import Generation, SamplingConfig, eos_ids, response_mask_after_eos

logger = logging.getLogger(__name__)

# generation_config.json entries that do not change which tokens are drawn (not worth a log line)
NOT_SAMPLING_SETTINGS = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "_from_model_config",
                         "use_cache", "cache_implementation"}  # fmt: skip


def generation_config(sampling: SamplingConfig) -> GenerationConfig:
    """Hugging Face's ``GenerationConfig`` for ``sampling`` (greedy when ``temperature <= 0``)."""
    sample = sampling.temperature > 0
    return GenerationConfig(
        do_sample=sample,
        num_beams=sampling.num_beams,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        temperature=sampling.temperature if sample else None,
        top_k=sampling.top_k if sample else None,  # 0 = off; None would mean generate's default, 50
        top_p=sampling.top_p if sample else None,
        eos_token_id=list(eos_ids(sampling.eos_token_id)) or None,
        pad_token_id=sampling.pad_token_id,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )


class HFGenerator:
    """Samples with ``model.generate`` (KV cache, multinomial sampling with temperature/top-k/top-p).

    ``model_context`` yields the model to generate with (for the PEFT bundle: the base with the actor
    adapter active); sampling draws from the global torch RNG, so a seeded run is reproducible.
    The log-probs of the sampled tokens come from generate's raw logits (``output_logits``: before any
    processor or warper) as log softmax(logits / temperature), the policy that sampled; the PPO loop uses
    them as the old log-probs instead of running the actor over the rollout again. With beam search
    (``num_beams > 1``) the raw logits follow the beams, not the returned rows, so no log-probs come back.
    Greedy when ``temperature <= 0``.
    """

    def __init__(
        self, model_context: Callable[[], AbstractContextManager[Any]], sampling: SamplingConfig
    ) -> None:
        self.model_context = model_context
        self.sampling = sampling
        self.config = generation_config(sampling)
        self._reported = False

    def prepare(self) -> None:
        """Nothing to allocate: ``generate`` grows its own cache at every call."""

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig | None = None
    ) -> Generation:
        """``sampling``: other settings than the generator's for this call (e.g. greedy for an evaluation)."""
        sampling = sampling or self.sampling
        config = self.config if sampling == self.sampling else generation_config(sampling)
        with self.model_context() as model, self._without_model_defaults(model):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        response = out.sequences[:, prompt_ids.shape[1] :]
        mask = response_mask_after_eos(response, sampling.eos_token_id)
        response = response.masked_fill(mask == 0, sampling.pad_token_id)
        if sampling.num_beams > 1:
            return Generation(response, mask)
        # the unprocessed logits of each step [B, V], one step at a time: stacked, then in float32 and
        # log-softmaxed whole, they would be several [B, R, V] float32 tensors at once
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        logprobs = torch.stack(
            [
                torch.log_softmax(step.float() / temperature, dim=-1).gather(-1, token[:, None]).squeeze(-1)
                for step, token in zip(out.logits, response.unbind(1))
            ],
            dim=1,
        )  # [B, R]
        return Generation(response, mask, logprobs * mask)

    @contextmanager
    def _without_model_defaults(self, model: Any) -> Iterator[None]:
        """``generate`` fills every setting our config leaves unset from the model's own
        ``generation_config.json`` (a repetition penalty, suppressed tokens, ``min_p``...): the tokens would
        come from another distribution than the one their log-probs describe, and than the static engine
        samples from. A blank configuration stands in for the model's while generating (one log line names
        the settings left out)."""
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        saved = getattr(target, "generation_config", None)
        if saved is None:
            yield
            return
        if not self._reported:
            self._reported = True
            ignored = sorted(
                key for key in set(saved.to_diff_dict()) - NOT_SAMPLING_SETTINGS
                if not key.startswith(("output_", "return_"))
            )  # fmt: skip
            if ignored:
                logger.info(
                    "generation: the model's generation_config.json settings %s are not used (sampling follows "
                    "the temperature, top-k and top-p given here)", ", ".join(ignored),
                )  # fmt: skip
        target.generation_config = GenerationConfig()
        try:
            yield
        finally:
            target.generation_config = saved
