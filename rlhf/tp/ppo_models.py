"""The PPO models bundle (:class:`rlhf.ppo.policy_interface.PolicyModels`) on tensor-parallel models.

| role | what it is |
|---|---|
| actor | ``--actor_ckpt_dir`` (the solver): LoRA adapters (``--lora_rank`` > 0) or fully trainable |
| reference | with LoRA the actor with its adapters switched off; full-parameter: a frozen copy |
| critic | ``--critic_ckpt_dir`` (the verifier) with its scalar head: LoRA + head, or fully trainable |
| reward | ``--reward_model_ckpt_dir`` (the verifier), frozen, score at the last real token; when it is the
  critic's own dir and the critic uses LoRA, it is the critic with adapters off + a frozen copy of the
  initial head (no second model in memory) |

Exports (``save_actor``/``save_critic``, collective: every rank writes its shard) are shard dirs like
``solver_train``'s, with LoRA folded into a copy of the weights (the running model keeps its adapters).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.ppo.batch import SequenceBatch
from rlhf.ppo.policy_interface import TrainableGroups
from rlhf.ppo.stats import entropy_from_logits, logprobs_from_logits
from rlhf.tp.lora import lora_layers
from rlhf.tp.model import ModelArgs, ScalarHeadTransformer, Transformer
from rlhf.tp.shard_dir import save_model_shards


@contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base: every LoRA update scaled by 0 inside the block."""
    layers = lora_layers(model).values()
    scales = [layer.lora_scale for layer in layers]
    for layer in layers:
        layer.lora_scale = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, scales):
            layer.lora_scale = scale


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's weights with every LoRA update folded in (as :func:`rlhf.tp.lora.merge_lora` does), on
    CPU; the model is left unchanged."""
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, layer in lora_layers(model).items():
        delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.lora_scale
        key = f"{name}.weight"
        state[key] = (state[key].float() + delta.cpu()).to(state[key].dtype)
    return state


class _Export:
    """What :func:`save_model_shards` reads from a model: its architecture and a state dict."""

    def __init__(self, args: ModelArgs, state: dict[str, torch.Tensor]) -> None:
        self.args, self._state = args, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class TPPolicyModels(TrainableGroups):
    """Actor, reference, critic and reward on TP models (see the module docstring)."""

    def __init__(
        self,
        actor: Transformer,
        critic: ScalarHeadTransformer,
        *,
        actor_source: str,
        critic_source: str,
        reference: Transformer | None = None,
        reward: ScalarHeadTransformer | None = None,
        reward_head: torch.nn.Linear | None = None,
    ) -> None:
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.actor_source, self.critic_source = actor_source, critic_source
        self.reward_head = reward_head  # with the critic's base: a frozen copy of its initial head
        self._trainable = {
            name: [(f"{name}.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
            for name, model in (("actor", actor), ("critic", critic))
        }

    @classmethod
    def sharing_critic_base(cls, actor, critic, **kwargs) -> TPPolicyModels:
        """The reward is the critic as loaded (LoRA off, initial head): for a LoRA critic from the RM dir."""
        head = copy.deepcopy(critic.v_head).requires_grad_(False)
        return cls(actor, critic, reward_head=head, **kwargs)

    def train(self, mode: bool = True) -> TPPolicyModels:
        self.actor.train(mode)
        self.critic.train(mode)
        return self

    # -- forward passes ------------------------------------------------------------------------------
    @staticmethod
    def _response_logits(model: Transformer, batch: SequenceBatch) -> torch.Tensor:
        """Logits that predict each response token (positions P-1 .. T-2): [B, R, V]."""
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)  # (B, T, D)
        return model.logits(hidden[:, batch.prompt_len - 1 : -1])

    def policy_logprobs(
        self, batch: SequenceBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self._response_logits(self.actor, batch)
        logprobs = logprobs_from_logits(logits, batch.response_ids, temperature)
        return logprobs, entropy_from_logits(logits, temperature) if with_entropy else None

    @torch.no_grad()
    def reference_logprobs(self, batch: SequenceBatch, temperature: float) -> torch.Tensor:
        model = self.reference if self.reference is not None else self.actor
        with lora_disabled(self.actor) if self.reference is None else nullcontext():
            logits = self._response_logits(model, batch)
        return logprobs_from_logits(logits, batch.response_ids, temperature)

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        scores = self.critic(batch.input_ids, batch.attention_mask)  # (B, T)
        return scores[:, batch.prompt_len - 1 : -1].float()

    @torch.no_grad()
    def reward_scores(self, batch: SequenceBatch) -> torch.Tensor | None:
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        if self.reward_head is not None:
            with lora_disabled(self.critic):
                hidden = self.critic.hidden_states(batch.input_ids, batch.attention_mask)
            last = hidden[rows, batch.last_token_positions]
            return self.reward_head(last.to(self.reward_head.weight.dtype)).squeeze(-1).float()
        if self.reward is None:
            return None
        scores = self.reward(batch.input_ids, batch.attention_mask)  # (B, T)
        return scores[rows, batch.last_token_positions].float()

    def pretrain_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.actor(input_ids)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
        )

    @contextmanager
    def generation_model(self) -> Iterator[Transformer]:
        yield self.actor

    # -- saving (parameter groups and trainable state per rank: TrainableGroups) --------------------
    def save_actor(self, directory: Path) -> None:
        """Collective: a shard dir (LoRA merged) that solver_evaluate and checkpoint_split --merge take."""
        save_model_shards(
            _Export(self.actor.args, merged_state_dict(self.actor)), directory, self.actor_source
        )

    def save_critic(self, directory: Path) -> None:
        """Collective: a verifier-style shard dir (``head: scalar``)."""
        export = _Export(self.critic.args, merged_state_dict(self.critic))
        save_model_shards(export, directory, self.critic_source, head="scalar")
