"""The policy interface the PPO loop talks to: actor, critic, reference and reward behind one object.

The loop never touches PEFT, adapters or tensor-parallel layers; it calls these methods on token
batches (:class:`rlhf.ppo.batch.SequenceBatch`). :class:`rlhf.ppo.peft_models.PeftPolicyModels` implements
it with one frozen base and LoRA adapters; a tensor-parallel implementation provides the same methods.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf.errors import CheckpointError
from rlhf.ppo.batch import SequenceBatch


class PolicyModels(Protocol):
    """Actor, reference policy, (optionally) a critic and (optionally) a reward model behind one object.

    The critic exists only when the advantage estimator needs one (``gae``): without it ``has_critic`` is
    False, ``parameter_groups`` has no ``"critic"`` group, and ``values``/``save_critic`` are not called.
    """

    @property
    def has_critic(self) -> bool:
        """Whether the bundle holds a critic (an adapter or model plus a value head)."""

    def train(self, mode: bool = True) -> Any:
        """Dropout on (``True``, for PPO updates) or off (rollouts, old and reference log-probs)."""

    def policy_logprobs(
        self, batch: SequenceBatch, temperature: float, with_entropy: bool = False, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Actor log π(r_t | prefix) of each response token under logits / temperature: [B, R]; with
        ``with_entropy`` also the entropy of each token distribution [B, R]. Differentiable; the entropy
        only with ``entropy_grad`` (else a metric, computed without a graph)."""

    def reference_logprobs(self, batch: SequenceBatch, temperature: float) -> torch.Tensor:
        """Frozen reference policy's log-probs of the response tokens [B, R] (no grad)."""

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        """Critic value V(s_t) of the state before each response token: [B, R]. Differentiable."""

    def reward_scores(self, batch: SequenceBatch) -> torch.Tensor | None:
        """Reward-model score read at the last real token: [B]; ``None`` without a reward model."""

    def pretrain_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Actor next-token cross-entropy on pretraining blocks [B, L] -> scalar. Differentiable."""

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters: ``{"actor": [...], "critic": [...]}`` (disjoint; no ``"critic"`` key
        without a critic)."""

    def generation_model(self) -> AbstractContextManager[Any]:
        """Context in which the yielded object generates with the actor (for a Generator)."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the actor's and critic's layers in their updates' backward (``--gradient_checkpointing``;
        non-reentrant, training forwards with gradients only, so the rollout's forwards are unchanged)."""

    def compile_layers(self, backend: str) -> None:
        """Run the decoder layers of the models the bundle trains (and of a reward adapter on their base)
        through ``torch.compile`` (``--torch_compile``; :mod:`rlhf.models.regional_compile`)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name (what a checkpoint must restore)."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`trainable_state` back in place (a CheckpointError when a tensor is missing or
        shaped otherwise)."""

    def adapter_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint's beyond the tensors' shapes (LoRA alphas)."""

    def save_actor(self, directory: Path) -> None:
        """Write the actor in a format plain ``peft``/``transformers`` load."""

    def save_critic(self, directory: Path) -> None:
        """Write the critic (adapter or model, plus the value head)."""


class TrainableGroups:
    """``parameter_groups``, ``trainable_state`` and ``load_trainable_state`` for an implementation that
    keeps its trainable parameters as ``self._trainable = {"actor": [(name, param), ...], "critic": [...]}``
    (names stable across runs; on a tensor-parallel backend each rank holds its own slices). A bundle
    without a critic has no ``"critic"`` key."""

    _trainable: dict[str, list[tuple[str, torch.nn.Parameter]]]

    @property
    def has_critic(self) -> bool:
        return "critic" in self._trainable

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {name: [p for _, p in group] for name, group in self._trainable.items()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for group in self._trainable.values() for n, p in group}

    def adapter_settings(self) -> dict[str, Any]:
        """Settings of the trainable adapters that a resumed run must share with the run that wrote the
        checkpoint but that no tensor's shape shows (``{"actor_lora_alpha": 16.0}``); none here."""
        return {}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        hint = (
            "it was written with other model settings (--sft_model_path, a LoRA rank or target modules, the "
            "tensor-parallel degree); resume with the same ones, or pass --overwrite_output_dir to start afresh"
        )
        for group in self._trainable.values():
            for name, param in group:
                if name not in state:
                    raise CheckpointError(f"the checkpoint has no tensor {name}: {hint}")
                if state[name].shape != param.shape:
                    raise CheckpointError(
                        f"the checkpoint's {name} has shape {list(state[name].shape)}, this run's "
                        f"{list(param.shape)}: {hint}"
                    )
                param.copy_(state[name])
