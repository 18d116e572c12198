"""The reward model: a sequence-classification head with one output, read at the last real token.

``AutoModelForSequenceClassification`` with ``num_labels=1`` puts a linear ``score`` head on every
position. HF pools it at the last token that is not the pad id, which is wrong when the pad token is the
EOS token that ends every sequence. :func:`sequence_rewards` instead reads the head at the last position
of the attention mask (right- or left-padded alike), capturing the per-token scores with a forward hook
so the call still goes through the outer (DDP/DeepSpeed/PEFT) wrapper.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from rlhf.errors import CheckpointError, ConfigError
from rlhf.models import adapter_base_path, is_adapter_dir, load_config, resolve_dtype
from rlhf.models.loading import (
    ADAPTER_CONFIG,
    adapter_task_type,
    check_adapter_weights,
    weights_from_pretrained,
)

logger = logging.getLogger(__name__)

HEAD_NAMES = ("score", "classifier")


def stored_weight_names(path: str) -> set[str] | None:
    """The tensor names a model dir's safetensors weights hold (headers only; ``None`` when it has none
    to read that way, e.g. ``pytorch_model.bin``)."""
    from safetensors import safe_open

    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as handle:
        return set(handle.keys())


def check_head_for_evaluation(path: str) -> None:
    """An evaluation without training and without ``--peft_path`` scores with the head stored at ``path``:
    refuse a model dir that stores none (a causal LM, an SFT adapter), whose head would be drawn at random."""
    if is_adapter_dir(path):
        stores_head = False  # an adapter goes in --peft_path, on its base
    else:
        names = stored_weight_names(path)  # None: not readable from headers (.bin), given the benefit
        stores_head = names is None or any(name.split(".")[0] in HEAD_NAMES for name in names)
    if not stores_head:
        raise ConfigError(
            f"--do_eval without --do_train evaluates --model_name_or_path {path} as a reward model, but it "
            "stores no trained score head: its scores would come from a randomly drawn one; pass the "
            "reward adapter as --peft_path, or a trained reward model dir"
        )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1, for right and left padding. ``attention_mask``: (B, T)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost ``score`` module (a PEFT ``ModulesToSaveWrapper`` when the model has an adapter)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            return module
    raise CheckpointError("the reward model has no score head")


def token_scores(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """(B, T) score head output at every position of one forward of ``model(**inputs)``."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured[-1].squeeze(-1)


def float32_last_token_scores(
    model: torch.nn.Module, attention_mask: torch.Tensor, **inputs: Any
) -> torch.Tensor:
    """(B,) float32 score of each sequence at its last real token, the score head applied in float32 to the
    hidden state it receives, also under ``--bf16``/``--fp16`` autocast or with half-precision weights:
    half precision would round each score to about 3 significant digits (at 4 the step is 0.03), enough for
    the responses of a group to tie. A head that is no plain ``Linear`` keeps its own output."""
    head = score_head(model)
    if not isinstance(head, torch.nn.Linear):
        scores = token_scores(model, attention_mask=attention_mask, **inputs)
        return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1).float()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(attention_mask=attention_mask, **inputs, use_cache=False)
    finally:
        handle.remove()
    hidden = captured[-1]  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(last.device.type, enabled=False):
        return torch.nn.functional.linear(last.float(), head.weight.float(), bias).squeeze(-1)


def sequence_rewards(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) scalar reward of each sequence: the score head at its last real token. Inputs: (B, T)."""
    scores = token_scores(model, input_ids=input_ids, attention_mask=attention_mask)  # (B, T)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1).float()


def pad_apart_from_eos(tokenizer: Any) -> None:
    """Pad with the tokenizer's unknown token when its pad token is its EOS (what a llama-style tokenizer
    without a pad token gets), so that the saved model scores like this stage in plain transformers.

    Training reads the head at the last real token, the EOS that ends every sequence. HF's own pooling
    reads the last token that is not the pad id: with pad = EOS, the token before it. The pad id goes
    into the saved config and tokenizer, so with pad = unk HF's pooling also lands on the EOS, in padded
    batches too. Without an unknown token the pad stays the EOS and a warning says how to score.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    unk = tokenizer.unk_token_id
    if unk is not None and unk != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        logger.info("reward model: padding with %s (the pad token was the EOS)", tokenizer.unk_token)
        return
    logger.warning(
        "reward model: the tokenizer pads with its EOS and has no other token to pad with; transformers' own "
        "pooling (.logits of the saved model) reads the token before the EOS, this stage the EOS itself: "
        "score with rlhf.reward.model.sequence_rewards (or at the last real token)"
    )


def load_reward_backbone(
    path: str,
    *,
    pad_token_id: int,
    torch_dtype: str | None = "auto",
    model_type: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A fresh-headed reward model on the weights at ``path`` (an SFT adapter dir is merged first)."""
    dtype = resolve_dtype(torch_dtype, load_config(path, model_type, trust_remote_code))
    base = adapter_base_path(path) if is_adapter_dir(path) else path
    if is_adapter_dir(path):
        check_adapter_weights(path, "--model_name_or_path")
    model = weights_from_pretrained(
        AutoModelForSequenceClassification,
        base,
        num_labels=1,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    if is_adapter_dir(path):
        from peft import PeftConfig, PeftModel

        # an SFT adapter says CAUSAL_LM, which PEFT would wrap around a classifier as a generator: only its
        # LoRA weights are wanted here, merged into the backbone
        config = PeftConfig.from_pretrained(path)
        config.task_type = None
        model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
        logger.info("merged adapter %s into the reward model's backbone", path)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    return model


def load_reward_model(path: str, *, torch_dtype: str | None = "auto", trust_remote_code: bool = False) -> Any:
    """A trained reward model for scoring: a full model dir, or an RM adapter (with its head) on its base.

    A model without a trained score head (a causal LM, such as the SFT model, or a ``CAUSAL_LM`` adapter)
    is refused: transformers would give it a randomly initialised head, and PPO would optimise noise."""
    config = load_config(path, None, trust_remote_code)
    adapter = is_adapter_dir(path)
    if adapter:
        check_reward_adapter(path)
    model, info = weights_from_pretrained(
        AutoModelForSequenceClassification,
        adapter_base_path(path) if adapter else path,
        num_labels=1,
        dtype=resolve_dtype(torch_dtype, config),
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    missing = sorted(k for k in info["missing_keys"] if k.split(".", 1)[0] in HEAD_NAMES)
    if missing and not adapter:  # an adapter's base has no head: the adapter brings it
        raise CheckpointError(
            f"--reward_model_path {path}: no trained score head ({missing[0]} missing): it looks like a causal "
            "LM; train a reward model with run_rm_with_peft.py"
        )
    if model.config.pad_token_id is None:  # only read by HF's own pooling, which sequence_rewards bypasses
        model.config.pad_token_id = model.config.eos_token_id
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    return model.eval()


def check_reward_adapter(path: str) -> None:
    """CheckpointError unless the adapter dir ``path`` is a reward-model adapter (``SEQ_CLS``, which saves
    its score head) with its weights: an SFT adapter would score with a randomly initialised head."""
    recorded = adapter_task_type(path)
    if recorded != "SEQ_CLS":
        raise CheckpointError(
            f"{path}: a {recorded or 'task-less'} adapter (task_type in {ADAPTER_CONFIG}), not a reward model: "
            "it has no trained score head; train a reward model with run_rm_with_peft.py"
        )
    check_adapter_weights(path)
