"""The PPO models bundle (:class:`rlhf.ppo.policy_interface.PolicyModels`) on tensor-parallel models.

| role | what it is |
|---|---|
| actor | ``--actor_ckpt_dir`` (the solver): LoRA adapters (``--lora_rank`` > 0) or fully trainable |
| reference | with LoRA the actor with its adapters switched off; full-parameter: a frozen copy |
| critic | ``--critic_ckpt_dir`` (the verifier) with its scalar head: LoRA + head, or fully trainable; none
  (``critic=None``) for a critic-free ``--advantage_estimator`` |
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
from typing import Any

import torch

from rlhf.errors import ConfigError
from rlhf.ppo.batch import SequenceBatch
from rlhf.ppo.policy_interface import TrainableGroups
from rlhf.ppo.token_logprobs import CHUNK_BYTES, chunked_token_logprobs, positions_per_chunk
from rlhf.tp.lora import lora_layers
from rlhf.tp.model import ModelArgs, ScalarHeadTransformer, Transformer
from rlhf.tp.shard_dir import save_model_shards

TORCH_COMPILE_REFUSED = (
    "--torch_compile: compiles the decoder layers of a Hugging Face model (run_ppo_with_peft.py), not the "
    "tensor-parallel model's"
)


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
        critic: ScalarHeadTransformer | None,
        *,
        actor_source: str,
        critic_source: str | None,
        reference: Transformer | None = None,
        reward: ScalarHeadTransformer | None = None,
        reward_head: torch.nn.Linear | None = None,
    ) -> None:
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.actor_source, self.critic_source = actor_source, critic_source
        self.reward_head = reward_head  # with the critic's base: a frozen copy of its initial head
        self.logits_chunk_bytes = CHUNK_BYTES  # float32 logits of one chunk of positions
        self._trainable = {
            name: [(f"{name}.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
            for name, model in (("actor", actor), ("critic", critic))
            if model is not None
        }

    @classmethod
    def sharing_critic_base(cls, actor, critic, **kwargs) -> TPPolicyModels:
        """The reward is the critic as loaded (LoRA off, initial head): for a LoRA critic from the RM dir."""
        head = copy.deepcopy(critic.v_head).requires_grad_(False)
        return cls(actor, critic, reward_head=head, **kwargs)

    def train(self, mode: bool = True) -> TPPolicyModels:
        self.actor.train(mode)
        if self.critic is not None:
            self.critic.train(mode)
        return self

    # -- forward passes ------------------------------------------------------------------------------
    def _response_logprobs(
        self,
        model: Transformer,
        batch: SequenceBatch,
        temperature: float,
        with_entropy: bool,
        entropy_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π of each response token [B, R] (and its entropy): the output layer (``model.logits``) runs
        on a few response positions at a time (:mod:`rlhf.ppo.token_logprobs`), no [B, R, V] float32 logits."""
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)[:, batch.prompt_len - 1 : -1]
        chunk = positions_per_chunk(hidden.shape[0], model.vocab_size, self.logits_chunk_bytes)
        return chunked_token_logprobs(
            model.logits, hidden, batch.response_ids, temperature, chunk, with_entropy,
            entropy_grad=entropy_grad,
        )  # fmt: skip

    def policy_logprobs(
        self, batch: SequenceBatch, temperature: float, with_entropy: bool = False, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._response_logprobs(self.actor, batch, temperature, with_entropy, entropy_grad)

    @torch.no_grad()
    def reference_logprobs(self, batch: SequenceBatch, temperature: float) -> torch.Tensor:
        model = self.reference if self.reference is not None else self.actor
        with lora_disabled(self.actor) if self.reference is None else nullcontext():
            return self._response_logprobs(model, batch, temperature, with_entropy=False)[0]

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        if self.critic is None:
            raise ValueError("this models bundle has no critic (a critic-free --advantage_estimator)")
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
        """Mean next-token cross-entropy of the actor on [B, L] blocks, its output layer run in chunks."""
        hidden = self.actor.hidden_states(input_ids)[:, :-1]  # (B, L-1, D)
        chunk = positions_per_chunk(hidden.shape[0], self.actor.vocab_size, self.logits_chunk_bytes)
        logprobs, _ = chunked_token_logprobs(self.actor.logits, hidden, input_ids[:, 1:], 1.0, chunk)
        return -logprobs.mean()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block of the actor and the critic in their updates' backward (non-reentrant)."""
        for model in (self.actor, self.critic):
            if model is not None:
                model.gradient_checkpointing = True

    def compile_layers(self, backend: str) -> None:
        raise ConfigError(TORCH_COMPILE_REFUSED)  # ppo_train refuses the flag before any model loads

    @contextmanager
    def generation_model(self) -> Iterator[Transformer]:
        yield self.actor

    # -- saving (parameter groups and trainable state per rank: TrainableGroups) --------------------
    def adapter_settings(self) -> dict[str, Any]:
        """The LoRA alpha of the trained adapters: no tensor's shape shows it, and a changed alpha would
        silently rescale a resumed adapter (the PEFT bundle records ``actor_lora_alpha`` and
        ``critic_lora_alpha``; here actor and critic share ``--lora_alpha``, the key that names the flag in
        the refusal). Full-parameter: none."""
        models = [m for m in (self.actor, self.critic) if m is not None]
        alphas = sorted({layer.lora_alpha for m in models for layer in lora_layers(m).values()})
        if not alphas:
            return {}
        return {"lora_alpha": alphas[0] if len(alphas) == 1 else alphas}

    def save_actor(self, directory: Path) -> None:
        """Collective: a shard dir (LoRA merged) that solver_evaluate and checkpoint_split --merge take."""
        save_model_shards(
            _Export(self.actor.args, merged_state_dict(self.actor)), directory, self.actor_source
        )

    def save_critic(self, directory: Path) -> None:
        """Collective: a verifier-style shard dir (``head: scalar``)."""
        if self.critic is None:
            raise ValueError("this models bundle has no critic to save")
        export = _Export(self.critic.args, merged_state_dict(self.critic))
        save_model_shards(export, directory, self.critic_source, head="scalar")
