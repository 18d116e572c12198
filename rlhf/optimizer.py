"""AdamW and its learning-rate schedule, for the loops that are not a ``transformers.Trainer``.

The schedule is transformers' ``get_scheduler`` (``--lr_scheduler_type`` names), with the Trainer's
reading of ``--warmup_steps``: a value below 1 is a ratio of the total steps.

Parameters held in bfloat16 or float16 (full fine-tuning on a half-precision base: the TP trainers'
``--lora_rank -1`` on a GPU, PPO's ``--actor_lora_rank -1`` with ``--torch_dtype bfloat16``) are stepped
through float32 master copies (:class:`MasterWeightAdamW`): an AdamW step is about the learning rate, and
at 1e-5 most of them are below half a bfloat16 step of a weight of typical size, so stepping the bfloat16
tensor itself rounded nine in ten updates away. The model keeps computing in its own dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import get_scheduler

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

HALF_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that keeps a float32 master copy of each half-precision parameter and steps that instead.

    ``step`` swaps each such parameter's data for its master and its gradient for a float32 copy, runs
    AdamW (whose moments are float32 too), and writes the master back rounded into the parameter's own
    tensor (in place: views of it, such as a generation engine's, see the new values). Float32 parameters
    step as with plain AdamW. The masters live in the optimizer's state (``"master"``), so
    ``state_dict``/``load_state_dict`` save and restore them with the moments, bit for bit."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        swapped = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or param.dtype not in HALF_PRECISION:
                    continue
                state = self.state[param]  # AdamW initialises the moments of a param whose state is empty
                master = state.pop("master") if "master" in state else param.detach().float()
                half_data, half_grad = param.data, param.grad
                param.grad = None
                param.data = master
                param.grad = half_grad.float()
                swapped.append((param, half_data, half_grad))
        try:
            loss = super().step(closure)
        finally:
            for param, half_data, half_grad in swapped:
                master = self.state[param]["master"] = param.data
                param.grad = None
                param.data = half_data
                half_data.copy_(master)
                param.grad = half_grad
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As AdamW's, but the float32 state of a half-precision parameter stays float32 (torch casts a
        loaded state tensor to its parameter's dtype), and a master saved for a parameter that is float32
        now (a run resumed in another ``--torch_dtype``) is dropped: the parameter is its own master, and a
        master kept unused would come back, stale, at the next resume in half precision."""
        with self._parameters_as_float32():
            super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype not in HALF_PRECISION:
                    self.state[param].pop("master", None)

    @contextmanager
    def _parameters_as_float32(self) -> Iterator[None]:
        halves = [p for g in self.param_groups for p in g["params"] if p.dtype in HALF_PRECISION]
        originals = [p.data for p in halves]
        for param in halves:
            param.data = param.data.float()
        try:
            yield
        finally:
            for param, original in zip(halves, originals):
                param.data = original


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
    """AdamW over ``params`` (:class:`MasterWeightAdamW`) and its schedule over ``total_steps`` optimizer steps.

    An unknown scheduler name is a :class:`~rlhf.errors.ConfigError` naming ``--lr_scheduler_type``."""
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters")
    optimizer = MasterWeightAdamW(params, lr=lr, weight_decay=weight_decay)
    halves = [p for p in params if p.dtype in HALF_PRECISION]
    if halves:
        count = sum(p.numel() for p in halves)
        logger.info(
            "AdamW steps float32 master copies of %d half-precision parameter tensor(s) (%.2fB values, %.1f GB): "
            "steps of about the learning rate would round away in %s", len(halves), count / 1e9, count * 4 / 1e9,
            str(halves[0].dtype).removeprefix("torch."),
        )  # fmt: skip
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
