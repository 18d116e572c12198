"""Loading tokenizers, causal LMs and PEFT adapters from local directories (or the hub when online).

Rules every stage relies on:

- ``trust_remote_code`` is off unless the user passes ``--trust_remote_code``;
- weights load from safetensors when present;
- a tokenizer without a pad token gets one (its EOS or UNK token); code never derives masks from the
  pad id, so padding can never hide a real EOS;
- an adapter directory (``adapter_config.json``) is loaded onto the base model it names.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from rlhf.errors import CheckpointError, ConfigError
from rlhf.models.model_types import check_model_type

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"


_precision_fallback_warned = False


def warn_precision_fallback(flags: list[str]) -> None:
    """One warning line per process that GPU-only precision flags are ignored and float32 is used."""
    global _precision_fallback_warned
    if flags and not _precision_fallback_warned:
        _precision_fallback_warned = True
        logger.warning(
            "%s need%s a GPU; none found, so float32 is used", " and ".join(flags), "s" * (len(flags) == 1)
        )


def checkpoint_dtype(config: PretrainedConfig | None) -> str | None:
    """The dtype name a checkpoint's ``config.json`` records (``"float16"``, ...), or None when it names none."""
    recorded = getattr(config, "dtype", None) if config is not None else None
    return str(recorded).removeprefix("torch.") if recorded else None


def resolve_dtype(name: str | None, config: PretrainedConfig | None = None) -> torch.dtype | str:
    """``--torch_dtype`` to a torch dtype (or ``"auto"``); half precision without a GPU becomes float32.

    ``auto`` with the checkpoint's ``config`` is the dtype its ``config.json`` records, under the same rule
    (a float16 checkpoint loads in float32 on a machine without GPU); without a config, or when the config
    records none, it stays ``"auto"`` for transformers to decide. The warning is a single line so a command
    copied from a GPU recipe still runs on a laptop.
    """
    if name in (None, "", "auto"):
        recorded = checkpoint_dtype(config)
        if recorded not in DTYPES:
            return "auto"
        dtype, flag = DTYPES[recorded], f"--torch_dtype auto (a {recorded} checkpoint)"
    elif name not in DTYPES:
        raise ConfigError(f"--torch_dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    else:
        dtype, flag = DTYPES[name], f"--torch_dtype {name}"
    if dtype != torch.float32 and not torch.cuda.is_available():
        warn_precision_fallback([flag])
        return torch.float32
    return dtype


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PEFT adapter directory."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | os.PathLike) -> str:
    """The ``base_model_name_or_path`` recorded in an adapter's config."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{config_path}: cannot read base_model_name_or_path ({exc})") from None
    if not base:
        raise CheckpointError(f"{config_path}: base_model_name_or_path is empty")
    return base


def _check_exists(path: str) -> None:
    looks_local = os.path.isabs(path) or path.startswith(".") or os.sep in path.rstrip(os.sep)
    if Path(path).exists():
        if not Path(path).is_dir():
            raise CheckpointError(
                f"{path}: a file, not a model directory (config.json or {ADAPTER_CONFIG} in it)"
            )
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file() and not is_adapter_dir(path):
            raise CheckpointError(f"{path}: not a model directory (no config.json or {ADAPTER_CONFIG})")
    elif looks_local and path.count("/") != 1:
        raise CheckpointError(f"{path}: no such model directory")


def load_config(
    path: str, model_type: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The checkpoint's config, validated against ``--model_type``."""
    _check_exists(path)
    if is_adapter_dir(path):
        path = adapter_base_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = ""
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            hint = "; pass --trust_remote_code to run the code in that directory, once you have read it"
        raise CheckpointError(
            f"{path}: cannot load config ({str(exc).splitlines()[0].strip()}){hint}"
        ) from None
    if getattr(config, "auto_map", None) and not trust_remote_code:
        logger.warning(
            "%s/config.json names code of its own (auto_map) for the model type %r, which transformers "
            "implements: its own classes are used; pass --trust_remote_code to run the directory's code instead",
            path, config.model_type,
        )  # fmt: skip
    check_model_type(model_type, config.model_type, f"{path}/config.json")
    return config


def weights_from_pretrained(model_class: Any, path: str, **kwargs: Any) -> torch.nn.Module:
    """``model_class.from_pretrained(path, **kwargs)``; a ``.bin``/``.pth`` weights file that holds more
    than tensors (refused by ``torch.load(weights_only=True)``, as it may run code) is one line naming it."""
    try:
        return model_class.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["unpickling failed"]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])
        reason = reason.split(". ")[0].rstrip(".")  # the global it refused, not torch's advice after it
        raise CheckpointError(
            f"{path}: a weights file there holds more than tensors and is not loaded (torch.load with "
            f"weights_only=True: {reason}); convert it to safetensors where you trust its source"
        ) from None


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """The tokenizer saved with a model (or with an adapter, else its base), with a pad token set."""
    _check_exists(path)
    source = path
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        source = adapter_base_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CheckpointError(f"{source}: the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token; padding with %r (masks never come from pad ids)", fallback)
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    torch_dtype: str | None = "auto",
    model_type: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    adapter_trainable: bool = False,
) -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` from a model dir, or from an adapter dir loaded onto its base.

    ``torch_dtype`` is resolved by :func:`resolve_dtype` with the (base) checkpoint's config, so ``auto``
    is the recorded dtype, float32 for a half-precision checkpoint on a machine without GPU. With
    ``merge_adapter`` the adapter is merged and a plain transformers model returned; otherwise a
    ``PeftModel`` (trainable when ``adapter_trainable``).
    """
    dtype = resolve_dtype(torch_dtype, load_config(path, model_type, trust_remote_code))
    base_path = adapter_base_path(path) if is_adapter_dir(path) else path
    model = weights_from_pretrained(
        AutoModelForCausalLM, base_path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if not is_adapter_dir(path):
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, path, is_trainable=adapter_trainable)
    logger.info("loaded adapter %s onto %s", path, base_path)
    return model.merge_and_unload() if merge_adapter else model
