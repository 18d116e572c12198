"""What ``accelerate launch`` passes on to a stage, taken as the stage's own flags.

``accelerate launch`` hands its config file's settings to the script as environment variables:
``mixed_precision:`` (or ``--mixed_precision``) as ``ACCELERATE_MIXED_PRECISION``, and under a DeepSpeed
config its ``gradient_accumulation_steps:`` and ``gradient_clipping:`` as ``ACCELERATE_GRADIENT_*``.
transformers builds the DeepSpeed config from those variables and then requires it to equal the
``TrainingArguments``: an Accelerate DeepSpeed config with ``mixed_precision: bf16`` and no ``--bf16``
stopped the SFT and reward-model stages at their first step with a multi-line "DeepSpeed config values
that mismatch TrainingArguments values" traceback.

The Trainer stages now take them as flags (:func:`accelerate_launch_flags`):

- the launch's mixed precision becomes ``--bf16`` / ``--fp16`` when neither flag is given, as the PPO stage
  takes it (:func:`launched_precision`); without a GPU it is float32, with the one precision warning;
  a precision flag on the command line decides over the launch;
- a DeepSpeed launch's accumulation steps and clipping become ``--gradient_accumulation_steps`` and
  ``--max_grad_norm`` when those flags are not given; a flag that says otherwise is an error naming both.
"""

from __future__ import annotations

import logging
import math
import os

from rlhf.errors import ConfigError
from rlhf.models.loading import warn_precision_fallback

logger = logging.getLogger(__name__)

PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
PRECISION_FLAGS = ("--fp16", "--bf16")
# the DeepSpeed launcher's variable -> (the Trainer flag, the Accelerate config key)
DEEPSPEED_ENV_FLAGS = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
        "--gradient_accumulation_steps",
        "gradient_accumulation_steps",
    ),
    "ACCELERATE_GRADIENT_CLIPPING": ("--max_grad_norm", "gradient_clipping"),
}


def launched_precision() -> str:
    """The mixed precision ``accelerate launch`` asked for: ``"fp16"``, ``"bf16"`` or ``"no"``."""
    launched = os.environ.get(PRECISION_ENV, "no").lower()
    return launched if launched in ("fp16", "bf16") else "no"


def deepspeed_launched() -> bool:
    """Whether ``accelerate launch`` ran the script under a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """``{"--flag_name": value}`` for the flags in ``argv`` (either spelling, ``--a-b`` or ``--a_b``; the value
    after ``=`` or the next word, None for a bare switch)."""
    values: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        name = "--" + name[2:].replace("-", "_")
        if eq:
            values[name] = value
        else:
            follows = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            values[name] = argv[i + 1] if follows else None
    return values


def _precision_flags(given: dict[str, str | None], has_gpu: bool) -> list[str]:
    launched = launched_precision()
    if launched == "no":
        return []
    os.environ[PRECISION_ENV] = "no"  # transformers reads it; from here on the flags decide
    if any(flag in given for flag in PRECISION_FLAGS):
        return []
    if not has_gpu:
        warn_precision_fallback([f"mixed_precision: {launched} (from accelerate launch)"])
        return []
    logger.info(
        "mixed precision %s, from accelerate launch (its config or --mixed_precision): --%s",
        launched,
        launched,
    )
    return [f"--{launched}"]


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a == b


def _deepspeed_flags(given: dict[str, str | None]) -> list[str]:
    if not deepspeed_launched():
        return []
    flags: list[str] = []
    for env, (flag, key) in DEEPSPEED_ENV_FLAGS.items():
        launched = os.environ.get(env, "").strip().lower()
        if launched in ("", "none", "auto"):
            continue
        if flag not in given:
            flags += [flag, launched]
            logger.info("%s %s, from the Accelerate DeepSpeed config's %s", flag, launched, key)
        elif not _same_number(str(given[flag]), launched):
            raise ConfigError(
                f"{flag} {given[flag]} differs from {key}: {launched} in the Accelerate DeepSpeed config "
                f"(accelerate launch --config_file): drop the flag or make them equal"
            )
    return flags


def accelerate_launch_flags(argv: list[str], has_gpu: bool) -> list[str]:
    """The flags to add to a Trainer stage's ``argv`` for the settings ``accelerate launch`` passed on (none
    outside ``accelerate launch``); raises a ConfigError for a flag that contradicts its DeepSpeed config."""
    given = flag_values(argv)
    return _precision_flags(given, has_gpu) + _deepspeed_flags(given)
