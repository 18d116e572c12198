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

Under DeepSpeed ZeRO-3, transformers builds every model inside ``deepspeed.zero.Init``: each process holds
an empty partition of each weight, so PEFT's merge adds a full delta to a size-0 tensor (a RuntimeError) and
the base would be saved partitioned. There the merge happens first, outside ZeRO-3, on the main process
(:func:`merged_source_under_zero3`), which writes ``base_model`` as above; every process then loads that
plain model dir under ``zero.Init``, and :func:`write_base_if_adapter_source` only names it in the new
adapters' configs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from rlhf.data.files import files_signature
from rlhf.models.loading import is_adapter_dir, load_tokenizer
from rlhf.publish import publish_dir, staging_dir

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"

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
    also_named_in: Sequence[str | Path] = (),
) -> Path:
    """Write ``model``'s base (its adapters left out) to ``<output_dir>/base_model`` on the main process and
    name it as the base in every adapter config of ``model`` (a ``PeftModel``); returns the directory.
    ``merged_from``: the adapter dir merged into that base, recorded in ``merged_from.json``;
    ``also_named_in``: dirs outside ``output_dir`` where the run saves adapters naming it (a PPO critic)."""
    target = Path(output_dir) / BASE_MODEL_DIR
    if is_main:
        staging = staging_dir(target)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.save_pretrained(str(staging), state_dict=plain_base_state(base), safe_serialization=True)
        save_tokenizer(staging)
        if merged_from is not None:
            (staging / MERGED_FROM).write_text(json.dumps(adapter_provenance(merged_from), indent=1))
        if target.exists() and not (merged_from is not None and merged_from_adapter(target, merged_from)):
            _unname_old_adapters(Path(output_dir), target, [Path(d) for d in also_named_in])
        publish_dir(staging, target)
        logger.info("the merged base the new adapters were trained on (and name) is in %s", target)
    _name_as_base(model, target)
    return target


def _unname_old_adapters(output_dir: Path, base_dir: Path, others: list[Path]) -> None:
    """Another base is about to replace ``base_dir``: the adapters saved in ``output_dir`` before (the final
    model, and a PPO critic in a subdir or in one of ``others``) name it as their base and would load on the
    new one as a model that never existed, without an error. Their ``adapter_config.json`` goes first, so
    they load as no model."""
    candidates = [output_dir / ADAPTER_CONFIG, *output_dir.glob(f"*/{ADAPTER_CONFIG}")]
    for config in sorted({*candidates, *(d / ADAPTER_CONFIG for d in others)}):
        if config.parent.name.startswith("checkpoint-") or not config.is_file():
            continue  # a checkpoint is resumed only with the adapter it was trained on, which rewrites the base
        try:
            named = json.loads(config.read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            continue
        if named and Path(named).resolve() == base_dir.resolve():
            config.unlink()
            logger.warning(
                "%s: another base goes to %s, and the adapter saved there named the old one: its %s is removed "
                "(it would have loaded on the new base as a model that was never trained)",
                config.parent, base_dir, ADAPTER_CONFIG,
            )  # fmt: skip


def _name_as_base(model: torch.nn.Module, base_dir: Path) -> None:
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = str(base_dir.resolve())  # loads from any working directory


def _loaded_from(model: torch.nn.Module) -> Path | None:
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(path).resolve() if path else None


@contextmanager
def zero3_init_off() -> Iterator[None]:
    """transformers' ``from_pretrained`` without ``deepspeed.zero.Init`` inside the block: whole weights on
    this process. transformers decides by the DeepSpeed config it holds a weak reference to (set by the
    ``TrainingArguments``); it is unset for the block and set again after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    held = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)


def merged_source_under_zero3(
    source: str,
    output_dir: str | Path,
    load: Callable[[str], torch.nn.Module],
    args: Any,
    tokenizer: Any = None,
) -> str:
    """The model dir a stage should load for ``source`` (``--model_name_or_path``): ``source`` itself,
    except for an adapter dir under DeepSpeed ZeRO-3, where PEFT cannot merge into partitioned weights.

    Then the main process loads and merges it outside ZeRO-3 (``load``: the stage's own loader, which merges
    an adapter dir, so the base has the stage's class and config), writes the result to
    ``<output_dir>/base_model`` (:func:`write_adapter_base`, with ``merged_from.json``) while the others
    wait, and every process loads that plain dir, partitioned. ``args``: the ``TrainingArguments``
    (``process_index``, ``main_process_first``); ``tokenizer``: saved with it (``source``'s when None).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not (is_adapter_dir(source) and is_deepspeed_zero3_enabled()):
        return source
    with args.main_process_first(local=False, desc="merging the adapter dir outside ZeRO-3"):
        if args.process_index == 0:
            logger.info("DeepSpeed ZeRO-3: merging %s into its base outside ZeRO-3 first", source)
            with zero3_init_off():
                merged = load(source)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
            save_tokenizer = lambda path: tokenizer.save_pretrained(str(path))  # noqa: E731
            write_adapter_base(merged, Path(output_dir), save_tokenizer, True, merged_from=source)
            del merged
    return str(Path(output_dir) / BASE_MODEL_DIR)


def write_base_if_adapter_source(
    model: torch.nn.Module,
    source: str,
    output_dir: str | Path,
    tokenizer: Any,
    is_main: bool,
    also_named_in: Sequence[str | Path] = (),
) -> Path | None:
    """:func:`write_adapter_base` for a stage whose model (``source``: ``--model_name_or_path``,
    ``--sft_model_path``) is an adapter dir and which trains adapters (``model`` a ``PeftModel``); returns
    the directory written, None (nothing done) otherwise."""
    if not (is_adapter_dir(source) and isinstance(model, PeftModel)):
        return None
    target = Path(output_dir) / BASE_MODEL_DIR
    if _loaded_from(model.get_base_model()) == target.resolve() and merged_from_adapter(target, source):
        # written from source before loading (merged_source_under_zero3); the model's own weights may be
        # ZeRO-3 partitions, which must not overwrite it
        _name_as_base(model, target)
        return target
    return write_adapter_base(
        model,
        Path(output_dir),
        lambda path: tokenizer.save_pretrained(str(path)),
        is_main,
        merged_from=source,
        also_named_in=also_named_in,
    )
