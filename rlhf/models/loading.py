"""Loading tokenizers, causal LMs and PEFT adapters from local directories (or the hub when online).

Rules every stage relies on:

- ``trust_remote_code`` is off unless the user passes ``--trust_remote_code``;
- weights load from safetensors when present;
- a tokenizer without a pad token gets one (its EOS or UNK token); code never derives masks from the
  pad id, so padding can never hide a real EOS;
- an adapter directory (``adapter_config.json``) is loaded onto the base model it names;
- what cannot load is one line naming the directory: a dir without weights (a tensor-parallel shard dir
  says how to merge it), an adapter dir without its weights file, a reward-model adapter where a causal LM
  is wanted, a tokenizer with more tokens than the model has embedding rows.
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
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT's from_pretrained reads
# what transformers' from_pretrained reads from a model dir (its SAFE_WEIGHTS_* and WEIGHTS_* names)
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# a tensor-parallel shard dir (rlhf.tp.shard_dir.PARAMS, not imported: rlhf.tp imports this module)
SHARD_PARAMS = "params.json"


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


def recorded_base_path(path: str | None) -> str | None:
    """What a saved adapter's ``base_model_name_or_path`` records for its base ``path``: a local dir as its
    absolute path, so the adapter loads with plain ``peft`` from any working directory (PEFT records the
    path as given, relative to where training ran); anything else (a hub id, None) unchanged."""
    if not path or not Path(path).is_dir():
        return path
    return str(Path(path).resolve())


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PEFT adapter directory."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | os.PathLike) -> str:
    """The ``base_model_name_or_path`` recorded in an adapter's config."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, KeyError) and {"n_shards", "targets"} <= set(config):
            raise CheckpointError(
                f"{config_path}: the LoRA adapter a tensor-parallel trainer (solver_train, verifier_train) "
                f"writes beside its model, not a PEFT adapter: pass its parent dir {Path(adapter_dir).parent}, "
                "which holds the model with this adapter merged in"
            ) from None
        raise CheckpointError(f"{config_path}: cannot read base_model_name_or_path ({exc})") from None
    if not base:
        raise CheckpointError(f"{config_path}: base_model_name_or_path is empty")
    return base


def adapter_task_type(adapter_dir: str | os.PathLike) -> str | None:
    """The ``task_type`` an adapter's config records (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), or None."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        recorded = json.loads(config_path.read_text()).get("task_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read the adapter config ({exc})") from None
    return recorded or None


def check_adapter_weights(adapter_dir: str | os.PathLike, flag: str | None = None) -> None:
    """CheckpointError naming ``adapter_dir`` (and ``flag``) when it has no adapter weights file, which
    PEFT would otherwise look for on the hub and fail on with a traceback about a repo id."""
    if not any((Path(adapter_dir) / name).is_file() for name in ADAPTER_WEIGHTS):
        where = f"{flag} {adapter_dir}" if flag else str(adapter_dir)
        raise CheckpointError(
            f"{where}: an adapter dir without its weights (no {' or '.join(ADAPTER_WEIGHTS)}; a copy that "
            "missed a file, or a run that stopped before saving?)"
        )


def check_model_weights(path: str) -> None:
    """CheckpointError when the local directory ``path`` has a config.json but no weights transformers
    loads: a tensor-parallel shard dir (``params.json``) says how to merge it into an HF dir."""
    where = Path(path)
    if not where.is_dir() or any((where / name).is_file() for name in MODEL_WEIGHTS):
        return
    if (where / SHARD_PARAMS).is_file():
        raise CheckpointError(
            f"{path} is a tensor-parallel shard dir: merge it first with "
            f"`python checkpoint_split.py --merge --ckpt_dir {path} --save_path HF_DIR`"
        )
    raise CheckpointError(f"{path}: no model weights (none of {', '.join(MODEL_WEIGHTS)})")


def check_vocab_fits(tokenizer: Any, rows: int, what: str) -> None:
    """CheckpointError when ``tokenizer`` has more tokens than the model's ``rows`` embedding rows (an id
    past them is an ``IndexError`` mid-training); a smaller tokenizer is normal (padded embeddings)."""
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows "
            "(vocab_size): a tokenizer from another model? Use the tokenizer saved with this model"
        )


def stored_config_value(path: str | None, key: str) -> Any:
    """``key`` in the config.json of the local model dir ``path`` (of its base, for an adapter dir), or None
    when there is none to read: a hub id, an unreadable file (load_config says why), no such key."""
    if not path:
        return None
    if is_adapter_dir(path):
        path = adapter_base_path(path)
    try:
        return json.loads((Path(path) / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config_vocab_size(path: str) -> int | None:
    """``vocab_size`` in the config.json of the model dir ``path`` (:func:`stored_config_value`)."""
    return _positive_int(stored_config_value(path, "vocab_size"))


def model_context_length(path: str | None) -> int | None:
    """``max_position_embeddings`` in the config.json of the model dir ``path`` (of its base, for an adapter
    dir), or None when there is none to read (a hub id, a config without the field)."""
    return _positive_int(stored_config_value(path, "max_position_embeddings"))


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
    than tensors (refused by ``torch.load(weights_only=True)``, as it may run code) is one line naming it,
    and so is a local dir without weights (:func:`check_model_weights`)."""
    check_model_weights(path)
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
    """The tokenizer saved with a model (or with an adapter, else its base), with a pad token set.

    Every stage loads its tokenizer and its model from the same ``path``: a tokenizer with more tokens than
    the ``vocab_size`` of that model's config.json is refused here (:func:`check_vocab_fits`)."""
    _check_exists(path)
    source = path
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        source = adapter_base_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    vocab_size = _config_vocab_size(path)
    if vocab_size is not None:
        check_vocab_fits(tokenizer, vocab_size, path)
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
    flag: str | None = None,
) -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` from a model dir, or from an adapter dir loaded onto its base.

    ``torch_dtype`` is resolved by :func:`resolve_dtype` with the (base) checkpoint's config, so ``auto``
    is the recorded dtype, float32 for a half-precision checkpoint on a machine without GPU. With
    ``merge_adapter`` the adapter is merged and a plain transformers model returned; otherwise a
    ``PeftModel`` (trainable when ``adapter_trainable``). A reward-model (``SEQ_CLS``) adapter is refused:
    its score head has no place on a causal LM. ``flag`` (``--model_name_or_path``, ...) names ``path`` in
    errors.
    """
    dtype = resolve_dtype(torch_dtype, load_config(path, model_type, trust_remote_code))
    base_path = adapter_base_path(path) if is_adapter_dir(path) else path
    if is_adapter_dir(path):
        where = f"{flag} {path}" if flag else path
        if adapter_task_type(path) == "SEQ_CLS":
            raise CheckpointError(
                f"{where} is a reward-model adapter (task_type SEQ_CLS in {ADAPTER_CONFIG}), not a causal LM: "
                f"its score head would be dropped; give the SFT model or SFT adapter (its base is {base_path})"
            )
        check_adapter_weights(path, flag)
    model = weights_from_pretrained(
        AutoModelForCausalLM, base_path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if not is_adapter_dir(path):
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, path, is_trainable=adapter_trainable)
    logger.info("loaded adapter %s onto %s", path, base_path)
    return model.merge_and_unload() if merge_adapter else model
