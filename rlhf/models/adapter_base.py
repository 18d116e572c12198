"""The base of adapters trained on an adapter dir: that adapter merged into its base, written to disk.

A stage given an adapter dir as its model (``--model_name_or_path`` of SFT and the reward model,
``--sft_model_path`` of PPO) merges it into its base and trains new adapters on the result. That merged
model exists on no disk, so the new adapters' configs would name the original base and load, with plain
``peft``, as another model. :func:`write_adapter_base` writes it to ``<output_dir>/base_model`` (a plain
transformers model with the tokenizer) and points the adapters' configs at it: checkpoints and outputs then
load as the model that was trained. Nothing reads it during the run, so only the main process writes.

``base_model/merged_from.json`` records the adapter dir merged (its path and its files' signature): two
stages given the same adapter dir (the reward model and PPO, both on the SFT adapter) then know they train
on the same model (:func:`merged_from_adapter`), so PPO shares the reward adapter's base and starts the
critic from it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from rlhf.data.files import files_signature
from rlhf.models.loading import is_adapter_dir
from rlhf.publish import publish_dir, staging_dir

logger = logging.getLogger(__name__)

BASE_MODEL_DIR = "base_model"
MERGED_FROM = "merged_from.json"


def plain_base_state(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a PEFT-injected base with the adapters' tensors left out and PEFT's wrapper names
    undone (``q_proj.base_layer.weight`` -> ``q_proj.weight``): what the base saved alone holds."""
    return {
        key.replace(".base_layer.", ".").replace(".original_module.", "."): value
        for key, value in base.state_dict().items()
        if "lora_" not in key and ".modules_to_save." not in key
    }


def adapter_provenance(adapter_dir: str | Path) -> dict[str, Any]:
    """What ``merged_from.json`` records of the adapter dir merged into a written base."""
    return {"adapter_dir": str(Path(adapter_dir).resolve()), "files": files_signature(adapter_dir)}


def merged_from_adapter(base_dir: str | Path, adapter_dir: str | Path) -> bool:
    """True when ``base_dir`` is a base written by :func:`write_adapter_base` from ``adapter_dir`` as its files
    are now (same path, same signature): the same weights as ``adapter_dir`` merged into its base."""
    record = Path(base_dir) / MERGED_FROM
    if not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved == json.loads(json.dumps(adapter_provenance(adapter_dir)))  # lists, as read back


def write_adapter_base(
    model: torch.nn.Module,
    output_dir: Path,
    save_tokenizer: Callable[[Path], None],
    is_main: bool,
    merged_from: str | Path | None = None,
) -> Path:
    """Write ``model``'s base (its adapters left out) to ``<output_dir>/base_model`` on the main process and
    name it as the base in every adapter config of ``model`` (a ``PeftModel``); returns the directory.
    ``merged_from``: the adapter dir merged into that base, recorded in ``merged_from.json``."""
    target = Path(output_dir) / BASE_MODEL_DIR
    if is_main:
        staging = staging_dir(target)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.save_pretrained(str(staging), state_dict=plain_base_state(base), safe_serialization=True)
        save_tokenizer(staging)
        if merged_from is not None:
            (staging / MERGED_FROM).write_text(json.dumps(adapter_provenance(merged_from), indent=1))
        publish_dir(staging, target)
        logger.info("the merged base the new adapters were trained on (and name) is in %s", target)
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = str(target)
    return target


def write_base_if_adapter_source(
    model: torch.nn.Module, source: str, output_dir: str | Path, tokenizer: Any, is_main: bool
) -> Path | None:
    """:func:`write_adapter_base` for a stage whose model (``source``: ``--model_name_or_path``,
    ``--sft_model_path``) is an adapter dir and which trains adapters (``model`` a ``PeftModel``); returns
    the directory written, None (nothing done) otherwise."""
    if not (is_adapter_dir(source) and isinstance(model, PeftModel)):
        return None
    return write_adapter_base(
        model,
        Path(output_dir),
        lambda path: tokenizer.save_pretrained(str(path)),
        is_main,
        merged_from=source,
    )
