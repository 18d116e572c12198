"""What a resumed Trainer-stage run (SFT, reward model) must share with the run that wrote its checkpoint.

A ``checkpoint-N`` holds the optimizer step and, through it, the position in the data: N steps of
``--per_device_train_batch_size`` x ``--gradient_accumulation_steps`` x processes examples, in the order
``--seed`` shuffled them. Resumed with another batch size, that position silently means other examples; with
another adapter the weights do not even load (a wall of size-mismatch errors, or "Can't find a checkpoint
index" from LoRA to full fine-tuning). So each checkpoint records these settings in
``resume_settings.json`` when it is saved (:class:`rlhf.training.outputs.AtomicCheckpointMixin`), and a
resume compares them before training (:func:`check_resume_settings`), as PPO and the TP trainers do:

- from the ``TrainingArguments``: the number of processes, ``--per_device_train_batch_size``,
  ``--gradient_accumulation_steps``, ``--seed``, ``--data_seed`` (compared before the model loads), and the
  DeepSpeed ZeRO stage (0 without DeepSpeed; from ``--deepspeed`` or an Accelerate DeepSpeed config): each
  stage lays out DeepSpeed's state its own way, and DeepSpeed met another's with a bare ``AssertionError``;
- from the model built: ``--lora_rank`` (-1: full fine-tuning) and, for LoRA, ``--lora_alpha``,
  ``--lora_target`` and ``--modules_to_save`` as the adapter has them (``--peft_path``'s own), and the
  base model's path;
- from the data: the number of training examples, and ``files of --FLAG`` (name, size and modification time
  of each file: :func:`rlhf.data.files.files_signature`) for each input path the stage names
  (:func:`rlhf.training.runner.stage_inputs`: ``--dataset_dir``, ``--model_name_or_path``, ``--peft_path``).

A mismatch is one line listing each differing setting as ``name: checkpoint X, now Y``. What may change
between a run and its resume is not recorded: ``--max_steps``, ``--num_train_epochs``, the learning rate and
schedule, logging, evaluation and saving, ``--packing`` (it lays a batch out differently, the same examples
in the same order) and the output dir. A checkpoint without ``resume_settings.json`` (written before they
were recorded) still resumes, with a warning; a setting only one side records is not compared.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from rlhf.data.files import files_signature
from rlhf.errors import CheckpointError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "resume_settings.json"
FULL_FINE_TUNING = -1  # the --lora_rank recorded for full fine-tuning
PROCESSES = "number of processes"
ZERO_STAGE = "DeepSpeed ZeRO stage"  # 0: no DeepSpeed (or ZeRO off)


def deepspeed_config(args: Any) -> dict[str, Any] | None:
    """The DeepSpeed config of a run: ``--deepspeed``'s, or that of an Accelerate config with
    ``distributed_type: DEEPSPEED`` (transformers then builds ``args.deepspeed_plugin`` from
    ``ACCELERATE_USE_DEEPSPEED`` without ``--deepspeed``: its checkpoints are DeepSpeed's all the same).
    None without DeepSpeed; ``{}`` when the run uses DeepSpeed but its config cannot be read here."""
    if getattr(args, "deepspeed", None):
        config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
        if config is None and isinstance(args.deepspeed, dict):
            config = args.deepspeed
        return config if isinstance(config, dict) else {}
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        return None
    config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    if isinstance(config, dict):
        return config
    stage = getattr(plugin, "zero_stage", None)
    return {"zero_optimization": {"stage": stage}} if stage is not None else {}


def zero_stage(args: Any) -> int | None:
    """The ZeRO stage a run trains under: 0 without DeepSpeed (or with ZeRO off), None when its DeepSpeed
    config cannot be read here."""
    config = deepspeed_config(args)
    if config is None:
        return 0
    if not config:
        return None
    return int((config.get("zero_optimization") or {}).get("stage") or 0)


def args_settings(args: TrainingArguments) -> dict[str, Any]:
    """The settings of ``args`` that decide which examples an optimizer step takes, and the ZeRO stage,
    which decides how DeepSpeed's state is laid out (another stage's checkpoint fails in DeepSpeed with a
    bare ``AssertionError``)."""
    return {
        PROCESSES: args.world_size,
        ZERO_STAGE: zero_stage(args),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "data_seed": args.data_seed,
    }


def _names(value: Any) -> list[str]:
    if not value:
        return []
    return sorted({value} if isinstance(value, str) else set(value))


def _model_path(model: torch.nn.Module) -> str:
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def model_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The adapter (or full fine-tuning) of a built model, and the base model it was loaded from."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return {"lora_rank": FULL_FINE_TUNING, "model": _model_path(model)}
    adapter = peft_config[getattr(model, "active_adapter", "default")]
    return {
        "lora_rank": getattr(adapter, "r", None),
        "lora_alpha": getattr(adapter, "lora_alpha", None),
        "lora_target": _names(getattr(adapter, "target_modules", None)),
        "modules_to_save": _names(getattr(adapter, "modules_to_save", None)),
        "model": _model_path(model.get_base_model()),
    }


def inputs_settings(inputs: Mapping[str, str | None] | None) -> dict[str, Any]:
    """``files of --FLAG`` for each ``{"--FLAG": path}`` a stage reads (data, model)."""
    return {f"files of {flag}": files_signature(path) for flag, path in (inputs or {}).items() if path}


def trainer_settings(trainer: Any, inputs: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Everything :func:`check_resume_settings` compares, from a built ``transformers.Trainer``."""
    settings = args_settings(trainer.args) | model_settings(trainer.model) | inputs_settings(inputs)
    if trainer.train_dataset is not None and hasattr(trainer.train_dataset, "__len__"):
        settings["number of training examples"] = len(trainer.train_dataset)
    return settings


def write_settings(directory: str | Path, settings: Mapping[str, Any]) -> None:
    """Record ``settings`` in ``directory`` (a checkpoint being written)."""
    (Path(directory) / SETTINGS_FILE).write_text(json.dumps(dict(settings), indent=2, sort_keys=True) + "\n")


def read_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """The settings ``checkpoint`` recorded, or None when it recorded none (or they do not read)."""
    path = Path(checkpoint) / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _shown(name: str, value: Any) -> str:
    if name == "lora_rank" and value == FULL_FINE_TUNING:
        return f"{value} (full fine-tuning)"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: checkpoint X, now Y"`` for each setting both record with different values."""
    found = []
    for name in sorted(saved.keys() & current.keys()):
        old, new = saved[name], current[name]
        if isinstance(old, list) or isinstance(new, list):  # JSON turned tuples into lists
            old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
        if old == new:
            continue
        label = name if " " in name or name == "model" else f"--{name}"
        if name.startswith("files of "):
            found.append(f"{label}: changed since the checkpoint (names, sizes or modification times)")
        else:
            found.append(f"{label}: checkpoint {_shown(name, old)}, now {_shown(name, new)}")
    return found


def check_resume_settings(
    checkpoint: str | Path, current: Mapping[str, Any], warn_unrecorded: bool = True
) -> None:
    """Refuse (one-line :class:`CheckpointError`) to resume from ``checkpoint`` when it recorded other
    ``current`` settings; a checkpoint that recorded none is resumed (a warning when ``warn_unrecorded``)."""
    saved = read_settings(checkpoint)
    if saved is None:
        if warn_unrecorded:
            logger.warning(
                "%s records no resume settings (saved by an earlier version): batch size, adapter and data "
                "are not checked against this run", checkpoint,
            )  # fmt: skip
        return
    changed = differences(saved, current)
    if changed:
        raise CheckpointError(
            f"cannot resume from {checkpoint}, saved with other settings than this run's ({'; '.join(changed)}): "
            "run with the settings it was saved with, or pass --overwrite_output_dir to start afresh"
        )
