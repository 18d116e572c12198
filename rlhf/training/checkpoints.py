"""Which ``checkpoint-N`` folders of a Trainer-based stage can be resumed from, checked before training.

A checkpoint can be damaged or incomplete after it was published (a disk filled up, a copy was cut short, a
file was truncated or deleted by hand). The Trainer would only find out while loading it, with a traceback
that never names the file, or not at all: without ``optimizer.pt`` or ``scheduler.pt`` it resumes with a
fresh AdamW and learning-rate schedule. :func:`checkpoint_problem` first checks that every file a resume
needs is there (:class:`CheckpointLayout`):

- ``trainer_state.json``;
- without DeepSpeed: ``optimizer.pt``, ``scheduler.pt`` and the weights (``adapter_model.safetensors`` /
  ``.bin``, ``model.safetensors``, ``pytorch_model.bin`` or a sharded index with every shard it names);
- with DeepSpeed (``--deepspeed``, or an Accelerate config with ``distributed_type: DEEPSPEED``, which
  transformers turns into ``args.deepspeed_plugin``): ``latest`` and the ``global_step*/`` it names, holding
  the ``*model_states.pt`` and, under ZeRO, the ``*optim_states.pt`` of DeepSpeed's engine (weights and
  optimizer), one ``zero_pp_rank_<r>_*_optim_states.pt`` per rank (and under ZeRO-3 one
  ``zero_pp_rank_<r>_*_model_states.pt``) for the number of processes the checkpoint recorded, and
  ``scheduler.pt`` unless the DeepSpeed config brings its own scheduler (saved by DeepSpeed);

then reads each file a resume loads, cheaply:

- ``*.safetensors`` (``adapter_model``, ``model`` and its shards): header and every tensor, which must be
  finite;
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and ``*.bin`` weights: ``torch.load(weights_only=True,
  mmap=True)``, which reads the archive index and the pickled structure but not the tensor data;
- ``rng_state*.pth`` and DeepSpeed's ``global_step*/*.pt``: the zip archive index;
- ``trainer_state.json``: valid JSON.

:func:`newest_loadable_checkpoint` walks the checkpoints newest first and skips (with one log line naming
the file) those that fail.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rlhf.backend.state_files import load_failure
from rlhf.checkpoint_dirs import newest_loadable
from rlhf.training.resume_settings import PROCESSES, ZERO_STAGE, deepspeed_config, read_settings, zero_stage

logger = logging.getLogger(__name__)

TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
TORCH_WEIGHT_GLOBS = ("pytorch_model*.bin", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"


def _damaged(path: Path, exc: BaseException) -> str:
    reason = load_failure(exc)
    if reason.startswith("refused"):  # a pickle torch.load(weights_only=True) will not load
        return f"{path.name} is {reason}"
    first_line = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
    return f"{path.name} is truncated or corrupt ({first_line})"


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if not torch.isfinite(handle.get_tensor(key)).all():
                    return f"{path.name} holds non-finite weights ({key})"
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is damaged
        return _damaged(path, exc)
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        return _damaged(path, exc)
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return _damaged(path, exc)
    return None


# What a DeepSpeed checkpoint's global_step*/*.pt files may hold besides tensors and plain data (ZeRO-2 and
# ZeRO-3, fp32, bf16 and fp16 loss scaling): DeepSpeed unpickles them itself, with weights_only=False.
DEEPSPEED_STATE_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip


def _deepspeed_file_problem(path: Path) -> str | None:
    """A DeepSpeed state file that is damaged, or that names any class but DeepSpeed's own state classes:
    DeepSpeed loads it with a full unpickler, which would import (and could run) whatever it names. Read
    statically (the pickle's opcodes), no tensor is loaded."""
    problem = _zip_problem(path)
    if problem is not None:
        return problem
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if scan is None:
        return None
    try:
        unknown = sorted(set(scan(str(path))) - DEEPSPEED_STATE_CLASSES)
    except Exception as exc:  # noqa: BLE001 - an unreadable pickle is a damaged file
        return _damaged(path, exc)
    if unknown:
        return (
            f"{path.name} is refused: it holds {', '.join(unknown[:3])}, which DeepSpeed's loader would import "
            "(a pickle that could run code; only DeepSpeed's own state classes are let through)"
        )
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return _damaged(path, exc)
    return None


WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
DEEPSPEED_TAG_FILE = "latest"  # DeepSpeed's pointer to the global_step* dir to load


@dataclass(frozen=True)
class CheckpointLayout:
    """Which files a resume of this run needs (see the module docstring).

    ``deepspeed``: the run uses DeepSpeed; None (:data:`ANY_LAYOUT`) accepts either layout, each checkpoint
    checked as what it looks like (a ``global_step*/`` dir means DeepSpeed). Under DeepSpeed only:
    ``zero_optimizer``, the optimizer state is in ``*optim_states.pt`` (ZeRO stage >= 1);
    ``scheduler_file``, the Trainer writes ``scheduler.pt`` (the config brings no scheduler of its own);
    ``zero_stage`` and ``processes``, this run's ZeRO stage and number of processes (None: unknown), which
    say which per-rank files it loads (:func:`_rank_files_missing`)."""

    deepspeed: bool | None = False
    zero_optimizer: bool = True
    scheduler_file: bool = True
    zero_stage: int | None = None
    processes: int | None = None


ANY_LAYOUT = CheckpointLayout(deepspeed=None, zero_optimizer=False, scheduler_file=False)


def layout_of(args: Any) -> CheckpointLayout:
    """The layout a run with these ``TrainingArguments`` writes and resumes from."""
    config = deepspeed_config(args)
    if config is None:
        return CheckpointLayout()
    processes = getattr(args, "world_size", None)
    if not config:  # unread: require only what every DeepSpeed checkpoint has
        return CheckpointLayout(
            deepspeed=True, zero_optimizer=False, scheduler_file=False, processes=processes
        )
    stage = zero_stage(args)
    return CheckpointLayout(
        deepspeed=True,
        zero_optimizer=bool(stage),
        scheduler_file="scheduler" not in config,
        zero_stage=stage,
        processes=processes,
    )


def _written_by_deepspeed(checkpoint: Path) -> bool:
    return (checkpoint / DEEPSPEED_TAG_FILE).is_file() or any(
        p.is_dir() for p in checkpoint.glob("global_step*")
    )


def _weights_missing(checkpoint: Path) -> list[str]:
    present = [name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    if not present:
        return ["the weights (adapter_model.safetensors, model.safetensors or pytorch_model.bin)"]
    for index in (name for name in present if name.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads((checkpoint / index).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue  # unreadable: the read checks name it
        lost = [shard for shard in shards if not (checkpoint / shard).is_file()]
        if lost:
            return [f"{lost[0]} (a shard {index} names)"]
    return []


def _rank_file(tag_dir: Path, rank: int, kind: str) -> str | None:
    """The name of ``rank``'s ``*zero_pp_rank_<rank>_mp_rank_*_<kind>_states.pt`` in ``tag_dir`` (with
    bf16, DeepSpeed prefixes ``bf16_``), or None when there is none."""
    for path in tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_*_{kind}_states.pt"):
        return path.name
    return None


def _rank_files_missing(checkpoint: Path, tag: str, layout: CheckpointLayout) -> list[str]:
    """The per-rank files of DeepSpeed's state that a resume loads but ``checkpoint/tag`` lacks: each rank
    loads its own ``zero_pp_rank_<r>_*_optim_states.pt`` (ZeRO) and, under ZeRO-3, its own
    ``zero_pp_rank_<r>_*_model_states.pt``; a missing one crashed that rank alone (``FileNotFoundError``)
    while the others waited.

    Which ranks and stage: those the checkpoint recorded (``resume_settings.json``), else this run's
    (``layout``). The checkpoint's own count, not this run's, so that a resume with another number of
    processes or ZeRO stage is refused by the settings check, in one line saying so, not reported as
    files missing. A checkpoint with a rank's model states is ZeRO-3's whatever it recorded.
    """
    tag_dir = checkpoint / tag
    saved = read_settings(checkpoint) or {}
    processes = saved.get(PROCESSES, layout.processes)
    stage = saved.get(ZERO_STAGE, layout.zero_stage)
    if not isinstance(processes, int) or processes < 1:
        return []
    kinds = []
    if (stage >= 1) if stage is not None else layout.zero_optimizer:
        kinds.append("optim")
    if stage == 3 or (stage is None and _rank_file(tag_dir, 0, "model")):
        kinds.append("model")
    for kind in kinds:
        present = sorted(path.name for path in tag_dir.glob(f"*zero_pp_rank_*_{kind}_states.pt"))
        for rank in range(processes):
            if _rank_file(tag_dir, rank, kind) is None:
                example = present[0] if present else f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt"
                name = re.sub(r"zero_pp_rank_\d+", f"zero_pp_rank_{rank}", example)
                return [f"{tag}/{name} (rank {rank}'s of {processes} processes)"]
    return []


def _deepspeed_missing(checkpoint: Path, layout: CheckpointLayout) -> list[str]:
    if not _written_by_deepspeed(checkpoint):
        return [f"DeepSpeed's state ({DEEPSPEED_TAG_FILE}, global_step*/: was it saved without --deepspeed?)"]
    tag_file = checkpoint / DEEPSPEED_TAG_FILE
    if not tag_file.is_file():
        return [f"{DEEPSPEED_TAG_FILE} (DeepSpeed's pointer to its global_step*/)"]
    tag = deepspeed_tag(checkpoint)
    if tag is None:
        return [f"a global_step*/ dir of this checkpoint that {DEEPSPEED_TAG_FILE} names"]
    missing = [] if any((checkpoint / tag).glob("*model_states.pt")) else [f"{tag}/*model_states.pt"]
    if layout.zero_optimizer and not any((checkpoint / tag).glob("*optim_states.pt")):
        missing.append(f"{tag}/*optim_states.pt")
    if not missing:
        missing = _rank_files_missing(checkpoint, tag, layout)
    if layout.scheduler_file and not (checkpoint / "scheduler.pt").is_file():
        missing.append("scheduler.pt")
    return missing


def deepspeed_tag(checkpoint: Path) -> str | None:
    """The dir DeepSpeed resumes from, as ``latest`` names it, when that is a dir directly inside
    ``checkpoint`` (a plain name: DeepSpeed would follow a path anywhere, past the checks here); else None."""
    try:
        tag = (checkpoint / DEEPSPEED_TAG_FILE).read_text().strip()
    except OSError:
        return None
    if not tag or Path(tag).name != tag or tag in (".", "..") or not (checkpoint / tag).is_dir():
        return None
    return tag


def deepspeed_state_files(checkpoint: Path) -> list[Path]:
    """The pickles DeepSpeed may load from ``checkpoint``: every ``global_step*/*.pt`` and everything
    under the dir ``latest`` names."""
    files = set(checkpoint.glob("global_step*/*.pt"))
    tag = deepspeed_tag(checkpoint)
    if tag is not None:
        files |= set((checkpoint / tag).rglob("*.pt"))
    return sorted(files)


def missing_files(checkpoint: str | Path, layout: CheckpointLayout = ANY_LAYOUT) -> list[str]:
    """What a resume with ``layout`` needs that ``checkpoint`` lacks (file names), or ``[]``."""
    checkpoint = Path(checkpoint)
    missing = [] if (checkpoint / TRAINER_STATE).is_file() else [TRAINER_STATE]
    deepspeed = _written_by_deepspeed(checkpoint) if layout.deepspeed is None else layout.deepspeed
    if deepspeed:
        return missing + _deepspeed_missing(checkpoint, layout)
    if _written_by_deepspeed(checkpoint) and not (checkpoint / "optimizer.pt").is_file():
        return [
            *missing,
            "optimizer.pt (it holds DeepSpeed's global_step*/ instead: resume with --deepspeed)",
        ]
    missing += [name for name in ("optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]
    return missing + _weights_missing(checkpoint)


def _incomplete(missing: list[str]) -> str:
    return f"incomplete: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"


def checkpoint_problem(checkpoint: str | Path, layout: CheckpointLayout = ANY_LAYOUT) -> str | None:
    """Why ``checkpoint`` cannot be resumed from by a run of ``layout`` (one phrase naming the file), or
    None when it loads."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "no such checkpoint directory"
    missing = missing_files(checkpoint, layout)
    if missing:
        return _incomplete(missing)
    checks = [(path, _safetensors_problem) for path in sorted(checkpoint.glob("*.safetensors"))]
    checks += [(checkpoint / name, _torch_file_problem) for name in TORCH_STATE_FILES]
    checks += [(path, _torch_file_problem) for glob in TORCH_WEIGHT_GLOBS for path in checkpoint.glob(glob)]
    checks += [(path, _zip_problem) for path in sorted(checkpoint.glob("rng_state*.pth"))]
    checks += [(path, _deepspeed_file_problem) for path in deepspeed_state_files(checkpoint)]
    checks.append((checkpoint / TRAINER_STATE, _json_problem))
    for path, check in checks:
        if path.is_file():
            problem = check(path)
            if problem is not None:
                return problem
    return None


def newest_loadable_checkpoint(
    output_dir: str | Path, layout: CheckpointLayout = ANY_LAYOUT
) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that loads or None, ``"checkpoint-N: <problem>"`` for each newer one skipped).

    Each skipped checkpoint is logged as a warning.
    """
    return newest_loadable(output_dir, partial(checkpoint_problem, layout=layout))
