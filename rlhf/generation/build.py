"""``--generation_engine {auto,hf,static}``: which generator serves a model, decided once with one log line.

- ``static``: :class:`rlhf.generation.engine.EngineGenerator` (static KV cache; CUDA graphs on GPU); a
  model or a setting it does not support is a :class:`rlhf.errors.ConfigError` naming the flag;
- ``hf``: :class:`rlhf.generation.hf.HFGenerator` (Hugging Face ``generate``), for HF models only;
- ``auto``: ``static`` wherever it supports the model and the settings, else ``hf``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from rlhf.errors import ConfigError
from rlhf.generation.base import Generator, SamplingConfig
from rlhf.generation.decoder import Decoder

logger = logging.getLogger(__name__)

ENGINES = ("auto", "hf", "static")
FLAG = "--generation_engine"
LORA_FLAG = "--generation_lora"


def _is_tp_model(model: Any) -> bool:
    return type(model).__module__.startswith("rlhf.tp.")


def unsupported_reason(model: Any, sampling: SamplingConfig) -> str | None:
    """Why the static engine cannot generate for ``model`` with ``sampling`` (None when it can)."""
    if sampling.num_beams > 1:
        return f"beam search (num_beams={sampling.num_beams}) is not implemented by the static engine"
    if _is_tp_model(model):
        from rlhf.generation import tp_decoder

        return tp_decoder.unsupported_reason(model)
    from rlhf.generation import hf_decoder

    return hf_decoder.unsupported_reason(model)


def decoder_for(model: Any, merge_lora: bool = False) -> Decoder:
    """The engine's model side for a TP Transformer or a Hugging Face causal LM (PEFT-wrapped or not);
    ``merge_lora``: decode from a copy of the weights with the active adapters folded in
    (:mod:`rlhf.generation.merged_decoder`; Hugging Face dense models only)."""
    if _is_tp_model(model):
        if merge_lora:
            raise ConfigError("merged LoRA weights are not implemented for the tensor-parallel model")
        from rlhf.generation.tp_decoder import TPDecoder

        return TPDecoder(model)
    if merge_lora:
        from rlhf.generation.merged_decoder import MergedLoraDecoder

        return MergedLoraDecoder(model)
    from rlhf.generation.hf_decoder import HFDecoder

    return HFDecoder(model)


def resolve_engine(kind: str, model: Any, sampling: SamplingConfig) -> str:
    """``hf`` or ``static`` for ``--generation_engine kind``; a ConfigError when ``kind`` cannot serve."""
    if kind not in ENGINES:
        raise ConfigError(f"{FLAG} must be one of {', '.join(ENGINES)}, got {kind!r}")
    reason = unsupported_reason(model, sampling)
    if kind == "static" and reason is not None:
        raise ConfigError(f"{FLAG} static: {reason} (use {FLAG} hf or auto)")
    if kind == "hf" and _is_tp_model(model):
        raise ConfigError(f"{FLAG} hf: the tensor-parallel model has no Hugging Face generate (use static)")
    if kind == "auto":
        if reason is not None and _is_tp_model(model):
            raise ConfigError(f"{FLAG} auto: {reason}")
        kind = "hf" if reason is not None else "static"
        logger.info(
            "generation engine: %s%s",
            kind, f" ({FLAG} auto: {reason})" if reason else f" ({FLAG} auto)",
        )  # fmt: skip
    else:
        logger.info("generation engine: %s (%s %s)", kind, FLAG, kind)
    return kind


def build_generator(
    kind: str,
    model_context: Callable[[], AbstractContextManager[Any]],
    sampling: SamplingConfig,
    *,
    max_prompt_length: int,
    max_batch_size: int,
    generator: torch.Generator | None = None,
    merge_lora: bool = False,
    **engine_options: Any,
) -> Generator:
    """The generator for ``--generation_engine kind`` (see the module docstring).

    ``model_context()`` yields the model to generate with (entered once here to look at it);
    ``max_prompt_length`` + ``sampling.max_new_tokens`` and ``max_batch_size`` size the static cache;
    ``generator`` seeds the static engine's sampling (HF generate uses the global RNG); ``merge_lora``:
    the static engine decodes from merged weights (:func:`decoder_for`);
    ``engine_options`` go to :class:`rlhf.generation.engine.RolloutEngine` (``cuda_graphs``,
    ``check_every``, ``prefill_chunk``, ``compile_backend``).
    """
    with model_context() as model:
        resolved = resolve_engine(kind, model, sampling)
        unsupported = "the tensor-parallel model" if _is_tp_model(model) else "the generator is HF generate"
        if merge_lora and (resolved == "hf" or _is_tp_model(model)):
            raise ConfigError(
                f"{LORA_FLAG} merged: the static engine on a Hugging Face dense model only ({unsupported}); "
                f"use {LORA_FLAG} unmerged"
            )
        if merge_lora:
            from rlhf.generation import merged_decoder

            reason = merged_decoder.unsupported_reason(model)
            if reason is not None:
                raise ConfigError(f"{LORA_FLAG} merged: {reason}; use {LORA_FLAG} unmerged")
        if engine_options.get("compile_backend") and (resolved == "hf" or _is_tp_model(model)):
            raise ConfigError(
                f"--generation_compile: the static engine on a Hugging Face model only ({unsupported})"
            )
    if resolved == "hf":
        from rlhf.generation.hf import HFGenerator

        return HFGenerator(model_context, sampling)
    from rlhf.generation.engine import EngineGenerator

    return EngineGenerator(
        model_context, sampling, max_prompt_length=max_prompt_length, max_batch_size=max_batch_size,
        decoder_factory=functools.partial(decoder_for, merge_lora=merge_lora), generator=generator,
        **engine_options,
    )  # fmt: skip
