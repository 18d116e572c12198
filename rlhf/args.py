"""Command-line argument groups shared by the stages, and the legacy-flag translation they all need.

Stage scripts parse ``(ModelArguments, DataArguments, LoraArguments, <stage dataclass>,
TrainingArguments)`` with :func:`parse_args`, which first rewrites the flags that recipes written for
older transformers still pass:

- ``--evaluation_strategy X`` -> ``--eval_strategy X``;
- ``--warmup_ratio R`` -> ``--warmup_steps R`` (transformers 5 reads a float below 1 as a ratio);
- ``--fp16`` / ``--bf16`` without a GPU -> dropped, with one warning line (training runs in float32);
- under ``accelerate launch``: its mixed precision -> ``--bf16``/``--fp16``, and a DeepSpeed config's
  accumulation and clipping -> ``--gradient_accumulation_steps``/``--max_grad_norm``, unless given
  (:mod:`rlhf.launch_settings`);
- ``--report_to wandb`` with no ``WANDB_API_KEY`` and no ``WANDB_MODE`` -> ``WANDB_MODE=offline``;
- ``torchrun``/``accelerate launch`` of several processes without a GPU -> ``--use_cpu True`` for the
  ``TrainingArguments`` stages (without it transformers runs each process as an independent,
  non-distributed copy on CPU: no DDP, no barriers), and under DeepSpeed its communication started on gloo
  (:func:`init_deepspeed_on_cpu`);
- several processes: DeepSpeed's communication module is imported before the process group exists
  (:func:`import_deepspeed_before_process_group`), so that it cannot keep the group alive past the run's end.

A YAML or JSON file given as the only argument stands in for the flags (:func:`config_file_argv`: the
file's keys become flags and go through the same rewrites and checks; a list for a comma-list flag such
as ``lora_target`` is joined with commas). After parsing, a ``TrainingArguments`` is checked up front
(:func:`check_training_arguments`): the run must have something to do (``--do_train`` with at least one
step, or ``--do_eval``), batch sizes and accumulation steps must be positive, the optimizer's
hyperparameters in the ranges it accepts, and ``--output_dir`` must not be a file; nor may
``--data_cache_dir``. The two checks (:func:`check_positive_flags`, :func:`check_output_dir`) are shared with
the stages that have their own config (PPO, the tensor-parallel tools).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from rlhf.errors import ConfigError
from rlhf.launch_settings import accelerate_launch_flags, deepspeed_launched, flag_values
from rlhf.models.loading import warn_precision_fallback
from rlhf.models.lora import DEFAULT_LORA_TARGET, LoraSpec

logger = logging.getLogger(__name__)

FLAG_RENAMES = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
GPU_ONLY_FLAGS = ("--fp16", "--bf16")
HALF_DTYPES = ("float16", "bfloat16")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local HF model dir (or hub id when online)."})
    model_type: str | None = field(
        default=None,
        metadata={"help": "llama, mistral, mixtral, qwen2, or a preset such as llama-2-7b; checked "
                  "against config.json (inferred when absent)."},
    )  # fmt: skip
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "auto, float32, float16 or bfloat16 (half precision needs a GPU).",
                  "choices": ["auto", "float32", "float16", "bfloat16"]},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own code."})
    peft_path: str | None = field(default=None, metadata={"help": "Adapter dir to continue training."})


@dataclass
class DataArguments:
    dataset_dir: str = field(metadata={"help": "Folder (or file) of *.json / *.jsonl / *.jsonl.gz records."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Where datasets keeps its cache."})
    split_ratio: float = field(default=0.01, metadata={"help": "Share of rows held out for evaluation."})
    block_size: int = field(
        default=512, metadata={"help": "Maximum tokens per example (prompt + response + EOS)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Tokenization processes."})

    def __post_init__(self):
        check_positive_flags({"--block_size": self.block_size})
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 0:
            raise ConfigError(
                f"--preprocessing_num_workers must be 0 or more (0: tokenize in this process), "
                f"got {self.preprocessing_num_workers}"
            )


@dataclass
class LoraArguments:
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank; -1 or 0 trains all weights."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(default=DEFAULT_LORA_TARGET, metadata={"help": "Comma list of module names."})
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma list of extra fully-trained modules; 'None' for none."}
    )

    def lora_spec(self) -> LoraSpec:
        """The adapter these flags describe (``rank <= 0`` = full training, see ``LoraSpec.use_lora``)."""
        return LoraSpec(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=split_comma_list(self.lora_target),
        )

    @property
    def extra_modules(self) -> list[str]:
        return split_comma_list(self.modules_to_save)


def split_comma_list(value: str | None) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; ``None``, ``""`` and ``"None"`` -> ``[]``."""
    if value is None or value.strip() in ("", "None", "none"):
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def _flag_value_follows(argv: list[str], i: int) -> bool:
    return i + 1 < len(argv) and not argv[i + 1].startswith("--")


def normalize_argv(argv: list[str], has_gpu: bool | None = None) -> list[str]:
    """Rewrite legacy flags and drop GPU-only precision flags on a machine without a GPU.

    Dropped flags and a half-precision ``--torch_dtype`` are reported together in one warning line.
    """
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    out: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in FLAG_RENAMES:
            out.append(FLAG_RENAMES[name] + eq + value)
        elif name in GPU_ONLY_FLAGS and not has_gpu:
            enabled = True
            if eq:
                enabled = value.lower() in ("1", "true", "yes")
            elif _flag_value_follows(argv, i) and argv[i + 1].lower() in ("true", "false", "1", "0"):
                enabled = argv[i + 1].lower() in ("1", "true")
                i += 1
            if enabled:
                ignored.append(name)
        else:
            if not has_gpu and name == "--torch_dtype":
                dtype = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
                if dtype in HALF_DTYPES:
                    ignored.append(f"--torch_dtype {dtype}")
            out.append(arg)
        i += 1
    warn_precision_fallback(sorted(ignored, key=lambda flag: flag.startswith("--torch_dtype")))
    return out


def configure_reporting(argv: list[str]) -> None:
    """Make ``--report_to wandb`` work without an account or network: offline mode unless configured."""
    if "wandb" not in " ".join(argv):
        return
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("no WANDB_API_KEY: wandb logs offline (sync later with `wandb sync`)")


def check_output_dir(path: str | os.PathLike | None, flag: str = "--output_dir") -> None:
    """Raise a ConfigError when ``path`` (a directory to write into) or one of its parents is a file.

    A missing directory is fine (the stage creates it); ``None`` or ``""`` is not checked.
    """
    if not path:
        return
    target = Path(path)
    for candidate in (target, *target.parents):
        if candidate.exists():
            if candidate.is_dir():
                return
            if candidate == target:
                raise ConfigError(f"{flag} {path} is a file, not a directory")
            raise ConfigError(f"{flag} {path}: {candidate} is a file, not a directory")


def check_output_not_input(
    output_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], flag: str = "--output_dir"
) -> None:
    """Raise a ConfigError when ``output_dir`` is one of the directories the run reads (``{"--flag": path}``):
    the final save replaces the model files there (an input model was deleted, and the adapter written in its
    place named itself as its base), and a data dir would read the run's JSON outputs as rows next time."""
    if not output_dir:
        return
    out = Path(output_dir).resolve()
    for name, path in inputs.items():
        if path and Path(path).is_dir() and Path(path).resolve() == out:
            raise ConfigError(
                f"{flag} {output_dir} is {name}: the run would write its model over what it reads; give it a "
                "directory of its own"
            )


def check_positive_flags(values: Mapping[str, int | float]) -> None:
    """Raise a ConfigError naming the first flag whose value is not > 0 (``{"--flag": value}``)."""
    for flag, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{flag} must be a positive number, got {value}")


def drop_missing_trackers(args: TrainingArguments) -> None:
    """Split a comma list (``--report_to wandb,tensorboard``, as PPO takes it) and drop a tracker whose
    package is not installed, with one warning, as the PPO stages do:
    the Trainer raised a traceback when it built the callback, after the stage had cleared ``--output_dir``
    under ``--overwrite_output_dir``. ``trainer_state.json`` still records every logged value."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    names = [name.strip() for entry in args.report_to for name in entry.split(",") if name.strip()]
    args.report_to = [name for name in names if name in available]  # a comma list as in PPO: one each
    missing = [name for name in names if name not in available]
    if missing:
        logger.warning(
            "--report_to %s: not an installed tracker (pip install it to log there); trainer_state.json still records "
            "the metrics", ", ".join(missing),
        )  # fmt: skip


def check_training_arguments(args: TrainingArguments) -> None:
    """Up-front checks of the Trainer flags the stages rely on, before any model or data is loaded.

    A run must do something: ``--do_train`` (``--eval_strategy`` other than ``no`` sets ``--do_eval``) or
    ``--do_eval``, and ``--do_train`` at least one step (``--max_steps`` > 0, or ``--max_steps`` <= 0, which
    trains by epochs as Trainer does, and ``--num_train_epochs`` > 0); otherwise the stage loaded everything
    and exited 0 having trained nothing. The PPO stages follow the same rule.
    """
    check_positive_flags(
        {
            "--per_device_train_batch_size": args.per_device_train_batch_size,
            "--per_device_eval_batch_size": args.per_device_eval_batch_size,
            "--gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
    )
    check_optimizer_flags(args)
    check_output_dir(args.output_dir, "--output_dir")
    drop_missing_trackers(args)
    if args.batch_eval_metrics:
        raise ConfigError(
            "--batch_eval_metrics is not supported: the stages' eval loss and accuracy are computed once over "
            "all held-out rows (drop the flag; their predictions are a few numbers per row)"
        )
    if not args.do_train and not args.do_eval:
        raise ConfigError(
            "nothing to do: pass --do_train to train (with --do_eval to evaluate on the --split_ratio "
            "held-out rows too), or --do_eval alone to evaluate --model_name_or_path on them"
        )
    if args.do_train and args.max_steps <= 0 and args.num_train_epochs <= 0:  # <= 0: by epochs (Trainer)
        raise ConfigError(
            f"nothing to train: --max_steps {args.max_steps}, --num_train_epochs {args.num_train_epochs:g} "
            "(give --max_steps > 0, or --num_train_epochs > 0)"
        )


def check_optimizer_flags(args: TrainingArguments) -> None:
    """A ConfigError naming the flag whose value the optimizer would refuse (with a traceback, when it is
    built after the model and data are loaded): the learning rate, weight decay and ``--max_grad_norm`` (0
    = no clipping) must be finite and >= 0,
    and for the Adam family ``--adam_beta1``/``--adam_beta2`` in [0, 1) and ``--adam_epsilon`` >= 0."""
    ranges = {"--learning_rate": args.learning_rate, "--weight_decay": args.weight_decay}
    if args.max_grad_norm is not None:  # Trainer reads a negative one as "no clipping", silently
        ranges["--max_grad_norm"] = args.max_grad_norm
    for flag, value in ranges.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if "adam" not in str(getattr(args.optim, "value", args.optim)):
        return
    for flag, value in {"--adam_beta1": args.adam_beta1, "--adam_beta2": args.adam_beta2}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon >= 0):
        raise ConfigError(f"--adam_epsilon must be a finite number >= 0, got {args.adam_epsilon}")


def _check_parsed(values: tuple[Any, ...]) -> tuple[Any, ...]:
    training = next((value for value in values if isinstance(value, TrainingArguments)), None)
    data = next((value for value in values if isinstance(value, DataArguments)), None)
    if training is not None:
        check_training_arguments(training)
        if "wandb" in (training.report_to or []) and not os.environ.get("WANDB_DIR"):
            os.environ["WANDB_DIR"] = training.output_dir  # <output_dir>/wandb, as PPO's, not ./wandb
    if data is not None:
        check_output_dir(data.data_cache_dir, "--data_cache_dir")
    for lora in (value for value in values if isinstance(value, LoraArguments)):
        lora.lora_spec()  # a bad --lora_alpha/--lora_dropout fails here, before --overwrite_output_dir acts
    if training is not None and data is not None and not training.do_train and data.split_ratio == 0:
        raise ConfigError(
            "nothing to do: --do_eval without --do_train evaluates the --split_ratio held-out rows, and "
            "--split_ratio 0 holds out none (give --split_ratio > 0, or --do_train)"
        )
    return values


def cpu_processes_flag(
    argv: list[str], dataclass_types: tuple[type, ...], has_gpu: bool | None = None
) -> list[str]:
    """``["--use_cpu", "True"]`` when a Trainer stage runs as several processes on a machine without a GPU.

    transformers only sets up CPU DDP (gloo) with ``use_cpu``; otherwise every process trains alone.
    """
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if has_gpu or world_size <= 1 or any(arg.partition("=")[0] == "--use_cpu" for arg in argv):
        return []
    if not any(issubclass(t, TrainingArguments) for t in dataclass_types):
        return []
    logger.info("%d processes without a GPU: distributed on CPU (gloo), as with --use_cpu", world_size)
    return ["--use_cpu", "True"]


def init_deepspeed_on_cpu(argv: list[str], has_gpu: bool | None = None) -> bool:
    """Start DeepSpeed's communication (gloo) when a Trainer stage runs DeepSpeed (``--deepspeed``, or
    ``ACCELERATE_USE_DEEPSPEED``) as several processes on a machine without a GPU; True when it did.

    On CPU the processes are distributed through ``--use_cpu`` (:func:`cpu_processes_flag`), with which
    transformers sets up torch's process group but never ``deepspeed.init_distributed``: DeepSpeed's own
    communication then knew one process, and the engine failed its ``train_batch_size`` check (the Trainer's
    batch counts every process). Initialising it first, DeepSpeed and torch share one gloo group.
    """
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    requested = any(arg.partition("=")[0] == "--deepspeed" for arg in argv) or deepspeed_launched()
    if has_gpu or world_size <= 1 or not requested:
        return False
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    logger.info("DeepSpeed on %d CPU processes: its communication runs on gloo", world_size)
    return True


def import_deepspeed_before_process_group() -> None:
    """Under a launcher, import ``deepspeed.comm.torch`` before torch's process group is created.

    That module binds ``torch.distributed.GroupMember.WORLD`` as a default argument of two methods when it is
    first imported. Imported after the group exists (the Trainer and Accelerate import it lazily), it holds the
    group past ``destroy_process_group``: the gloo threads then outlive the run and are torn down during the
    interpreter's exit, which now and then aborted a finished run (SIGABRT, "terminate called without an
    active exception"). Imported first, the defaults are None and DeepSpeed looks the group up per call.
    """
    if "WORLD_SIZE" not in os.environ or "deepspeed.comm.torch" in sys.modules:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return  # too late to help; the stage's end still destroys the group
    if importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed.comm.torch")


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

# String flags read with split_comma_list, beyond those whose help says "comma" (PPO's --report_to): a
# config file may give them as a list. (Trainer's --report_to is not one: it takes one integration name.)
COMMA_LIST_FLAGS = frozenset({"lora_target", "modules_to_save", "actor_lora_target", "critic_lora_target"})


def _list_value_flag_form(parser: HfArgumentParser | None, key: str) -> str:
    """How a config file's list for ``key`` becomes flag values: ``"several"`` (the flag takes a list, or
    the parser does not know it: its unknown-flag error follows), ``"comma"`` (a comma-list string flag) or
    ``"one"`` (the flag takes one value)."""
    # argparse has no public map from an option string to its action
    action = None if parser is None else parser._option_string_actions.get(f"--{key}")
    if action is None or action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        return "several"
    if key in COMMA_LIST_FLAGS or "comma" in (action.help or "").lower():
        return "comma"
    return "one"


def config_file_argv(path: str, parser: HfArgumentParser | None = None) -> list[str]:
    """The flags a YAML or JSON config file stands for: ``{key: value}`` -> ``--key value``, in file order.

    The flags then go the way typed flags go (legacy renames, the CPU precision fallback, types and
    choices checked, one-line errors), so a file and its flags mean the same. ``true``/``false`` and numbers
    are written as flags spell them, a list as several values; an empty (``null``) value keeps the
    default. A nested mapping has no flag form: give its settings as a file path (``deepspeed: ds.json``).
    Given the ``parser`` of the flags, a list for a flag that takes one value is joined with commas when the
    flag is a comma list (``lora_target: [q_proj, v_proj]`` -> ``--lora_target q_proj,v_proj``); a list of
    several values for another such flag is a ConfigError naming the key.
    """
    import yaml

    try:
        text = Path(path).read_text()
        config = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({exc})"
        ) from None
    if config is None:
        return []
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"{path}: expected a mapping of flag names to values, found {type(config).__name__}"
        )
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            raise ConfigError(
                f"{path}: {key} is a nested mapping, which has no flag form; put it in a JSON file and give "
                f"its path ({key}: settings.json)"
            )
        values = value if isinstance(value, (list, tuple)) else [value]
        form = _list_value_flag_form(parser, key) if isinstance(value, (list, tuple)) else "several"
        if form == "comma":
            values = [",".join(_flag_text(v) for v in values)]
        elif form == "one" and len(values) > 1:
            raise ConfigError(f"{path}: {key} is a list of {len(values)} values, but --{key} takes one value")
        argv += [f"--{key}", *(_flag_text(v) for v in values)]
    return argv


def _flag_text(value: Any) -> str:
    """A config file's value as a flag spells it (``True`` -> ``true``, ``1e-05`` stays a number)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Flags of other stages that a stage lacks, with where to look instead.
UNKNOWN_FLAG_HINTS = {
    "--deepspeed": "this stage does not run under DeepSpeed: with LoRA its trainable state is a few MB per "
    "process; several GPUs are plain data parallel (docs/ppo.md), a model too large for one GPU goes to the "
    "tensor-parallel backend (python -m rlhf.tp.ppo_train)",
}


# Trainer defaults the SFT and reward-model stages replace (TRL's SFTConfig and RewardConfig do the same):
# Trainer's --logging_steps 500 leaves a short run without a single loss row, and no curve to plot.
STAGE_DEFAULTS = ("--logging_steps", "10")
TRAINER_LOGGING_STEPS = "500"


def stage_defaults(argv: list[str]) -> list[str]:
    """The flags to put before ``argv``: :data:`STAGE_DEFAULTS`, and when neither ``--logging_steps`` nor
    ``--eval_steps`` is given, ``--eval_steps`` at Trainer's old cadence: Trainer evaluates every
    ``--logging_steps`` under ``--eval_strategy steps`` without ``--eval_steps``, which the new default
    would have turned from every 500 steps into every 10. Either spelling of a flag counts
    (``--logging_steps``, ``--logging-steps``)."""
    given = set(flag_values(argv))  # the underscore spelling: HfArgumentParser takes --logging-steps too
    if given & {"--logging_steps", "--eval_steps"}:
        return list(STAGE_DEFAULTS)
    return [*STAGE_DEFAULTS, "--eval_steps", TRAINER_LOGGING_STEPS]


def show_stage_defaults(parser: HfArgumentParser) -> None:
    """Make ``--help`` show the defaults :func:`stage_defaults` puts first on the command line ("(default:
    10)" for ``--logging_steps``, not Trainer's 500). Parsing is unchanged: those flags are always given."""
    parser.set_defaults(**{flag[2:]: value for flag, value in zip(STAGE_DEFAULTS[::2], STAGE_DEFAULTS[1::2])})


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse flags (or one YAML/JSON file) into the given dataclasses, after legacy-flag translation.

    A parsed ``TrainingArguments`` is validated with :func:`check_training_arguments`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    import_deepspeed_before_process_group()
    parser = HfArgumentParser(dataclass_types)
    if any(issubclass(t, TrainingArguments) for t in dataclass_types):
        parser.epilog = (
            "Also accepted, from older transformers: --evaluation_strategy (read as --eval_strategy) and "
            "--warmup_ratio R (a fraction of the steps, read as --warmup_steps R). A single YAML or JSON "
            "file of flags may replace them all. --logging_steps defaults to 10 here (not Trainer's 500); without "
            "--logging_steps and --eval_steps, --eval_steps is 500, as before."
        )
        show_stage_defaults(parser)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_argv(argv[0], parser)
    trainer_stage = any(issubclass(t, TrainingArguments) for t in dataclass_types)
    if trainer_stage:
        argv += accelerate_launch_flags(argv, torch.cuda.is_available())
    argv = normalize_argv(argv)
    if trainer_stage:
        argv = [*stage_defaults(argv), *argv]  # a flag given later wins
    argv += cpu_processes_flag(argv, dataclass_types)
    if trainer_stage:
        init_deepspeed_on_cpu(argv)
    configure_reporting(argv)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    *values, remaining = parsed
    if remaining:
        hints = [
            UNKNOWN_FLAG_HINTS[flag] for flag in remaining if flag.partition("=")[0] in UNKNOWN_FLAG_HINTS
        ]
        raise ConfigError(f"unknown flags: {' '.join(remaining)}" + "".join(f" ({hint})" for hint in hints))
    return _check_parsed(tuple(values))
