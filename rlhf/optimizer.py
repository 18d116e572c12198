"""AdamW and its learning-rate schedule, for the loops that are not a ``transformers.Trainer``.

The schedule is transformers' ``get_scheduler`` (``--lr_scheduler_type`` names), with the Trainer's
reading of ``--warmup_steps``: a value below 1 is a ratio of the total steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import get_scheduler

from rlhf.errors import ConfigError


def warmup_step_count(warmup: float, total_steps: int) -> int:
    """Warm-up steps: ``ceil(warmup * total_steps)`` when ``0 < warmup < 1`` (a ratio), else ``int(warmup)``."""
    return math.ceil(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def build_adamw(
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup: float,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``params`` and its schedule over ``total_steps`` optimizer steps.

    An unknown scheduler name is a :class:`~rlhf.errors.ConfigError` naming ``--lr_scheduler_type``."""
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        schedule = get_scheduler(
            scheduler,
            optimizer,
            num_warmup_steps=warmup_step_count(warmup, total_steps),
            num_training_steps=total_steps,
        )
    except ValueError as exc:
        raise ConfigError(f"--lr_scheduler_type {scheduler}: {exc}") from None
    return optimizer, schedule
