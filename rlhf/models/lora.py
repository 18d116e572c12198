"""LoRA set-up shared by every stage: one place that turns rank/alpha/dropout/targets into an adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, TaskType

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGET = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"


@dataclass
class LoraSpec:
    """An adapter's shape from flags, the one definition every stage uses (SFT/RM ``--lora_*``, PPO
    ``--actor_lora_*``/``--critic_lora_*``, the TP stages' ``--lora_*``).

    ``rank <= 0`` means no adapter: the model trains all its weights (decided here, by :attr:`use_lora`).
    An adapter's ``alpha`` must be > 0 (the scale alpha / r of 0 would never train it) and its ``dropout``
    in [0, 1): a ConfigError naming the flag ``flag_prefix + "alpha"`` (``--lora_alpha``; the PPO actor's
    spec says ``--actor_lora_``) otherwise, when the spec is made.
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: DEFAULT_LORA_TARGET.split(","))
    flag_prefix: str = field(default="--lora_", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.use_lora:
            return
        if not self.alpha > 0:  # also NaN
            raise ConfigError(
                f"{self.flag_prefix}alpha must be > 0 with {self.flag_prefix}rank {self.rank} (the LoRA scale "
                f"is alpha / r: 0 never trains the adapter), got {self.alpha}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{self.flag_prefix}dropout must be in [0, 1), got {self.dropout}")

    @property
    def use_lora(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """The LoRA output scale alpha / r."""
        return self.alpha / self.rank


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the ``nn.Linear`` modules of ``model`` (what ``--lora_target`` may name)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def check_target_modules(
    model: torch.nn.Module, targets: list[str], flag: str = "--lora_target"
) -> list[str]:
    """Keep the targets that exist in ``model``; warn about the others, error when none is left."""
    available = set(linear_module_names(model))
    present = [t for t in targets if t in available]
    missing = [t for t in targets if t not in available]
    if not present:
        raise ConfigError(
            f"{flag} {','.join(targets)} matches no linear layer of this model "
            f"(available: {', '.join(sorted(available))})"
        )
    if missing:
        logger.warning(
            "%s: %s not found in this model; LoRA goes on %s", flag, ",".join(missing), ",".join(present)
        )
    return present


def build_lora_config(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    modules_to_save: list[str] | None = None,
    task_type: TaskType = TaskType.CAUSAL_LM,
    flag: str = "--lora_target",
) -> LoraConfig:
    """A validated ``LoraConfig`` for ``model`` (``rank`` must be > 0)."""
    if rank <= 0:
        raise ConfigError(f"LoRA rank must be > 0 (use -1 or 0 for full training), got {rank}")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=check_target_modules(model, targets, flag),
        modules_to_save=modules_to_save or None,
        task_type=task_type,
    )
