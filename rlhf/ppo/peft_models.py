"""The PEFT implementation of :class:`rlhf.ppo.policy_interface.PolicyModels`: one frozen base, several adapters.

One causal LM is loaded once and frozen. On it live LoRA adapters ``actor``, ``critic`` and (when the
reward model was trained on the same base) ``reward``; the reference policy is the base with adapters
disabled. Switching the active adapter replaces a second copy of the weights. The critic's scalar value
head and the reward model's score head are plain ``Linear(hidden, 1)`` layers on the last hidden state.
A rank of -1 (or 0) makes the actor or critic a separate, fully trainable copy of the base
(:attr:`rlhf.models.lora.LoraSpec.use_lora` decides). The critic-free estimators (``grpo``, ``rloo``, ...)
build no critic: no ``critic`` adapter or copy and no value head.

Memory: log-probs and entropies come from the decoder body's hidden states and the LM head applied to a
few response positions at a time (:mod:`rlhf.ppo.token_logprobs`), the pretraining loss from the chunked
linear cross-entropy, so no ``[B, R, V]`` float32 logits exist; ``--gradient_checkpointing``
(:meth:`PeftPolicyModels.enable_gradient_checkpointing`) keeps one hidden state per decoder layer in the
updates.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from rlhf.errors import CheckpointError
from rlhf.models import load_causal_lm
from rlhf.models.fused_rms_norm import use_fused_rms_norm
from rlhf.models.loading import recorded_base_path
from rlhf.models.lora import LoraSpec, build_lora_config
from rlhf.models.lora_forward import use_fast_lora_forward
from rlhf.models.regional_compile import compile_decoder_layers
from rlhf.ppo.batch import SequenceBatch
from rlhf.ppo.policy_interface import TrainableGroups
from rlhf.ppo.stats import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.token_logprobs import CHUNK_BYTES, chunked_token_logprobs, positions_per_chunk
from rlhf.publish import publish_model_files, staging_dir
from rlhf.training.fused_loss import linear_cross_entropy, output_projection, resolve_implementation

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD = "value_head.safetensors"
SCORE_KEY = "base_model.model.score.weight"
# config attributes of families whose logits are more than lm_head(hidden) (gemma-2 soft-capping, cohere,
# granite scaling): their log-probs come from the model's own forward
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class RewardAdapter:
    """A reward-model adapter read from disk: its LoRA config, LoRA weights and score head."""

    config: LoraConfig
    lora_state: dict[str, torch.Tensor]
    score_weight: torch.Tensor  # [1, hidden]


UNSUPPORTED_REWARD_ADAPTER_OPTIONS = {  # adapter_config.json key -> the values that mean "not used"
    "alpha_pattern": (None, {}),
    "rank_pattern": (None, {}),
    "use_dora": (None, False),
    "lora_bias": (None, False),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
}


def read_reward_adapter(path: str) -> RewardAdapter:
    """Read ``run_rm_with_peft.py`` output: a SEQ_CLS LoRA adapter with ``score`` in modules_to_save."""
    directory = Path(path)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (is this a reward adapter dir?)")
    raw = json.loads((directory / "adapter_config.json").read_text())
    state = load_file(str(weights))
    score = [k for k in state if k.endswith("score.weight") or k.endswith("score.modules_to_save.weight")]
    if not score:
        raise CheckpointError(f"{path}: adapter has no score head (train it with modules_to_save=score)")
    extra = [k for k in state if "lora_" not in k and k not in score]
    if extra:
        raise CheckpointError(f"{path}: adapter also trains {extra[0]}...; only LoRA + score can be shared")
    # the shared adapter is rebuilt from the fields below: anything else would be dropped, and the rewards
    # (and the critic started from them) silently wrong
    unsupported = [
        name for name, off in UNSUPPORTED_REWARD_ADAPTER_OPTIONS.items() if raw.get(name) not in off
    ]
    if unsupported:
        raise CheckpointError(
            f"{path}: the reward adapter uses {', '.join(unsupported)}, which the shared reward adapter does not "
            "support (plain LoRA: r, lora_alpha, target_modules, rslora); merge it into a reward model and pass "
            "--reward_model_path instead"
        )
    config = LoraConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        lora_dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"],
        use_rslora=raw.get("use_rslora", False),
        bias=raw.get("bias", "none"),
        task_type=TaskType.CAUSAL_LM,
        inference_mode=True,
    )
    lora_state = {k: v for k, v in state.items() if "lora_" in k}
    return RewardAdapter(config, lora_state, state[score[0]].float())


class PeftPolicyModels(TrainableGroups, torch.nn.Module):
    """Actor, critic, reference and reward on one frozen base (see the module docstring)."""

    def __init__(
        self,
        lm: torch.nn.Module,
        adapters: list[str],
        value_head: torch.nn.Linear | None,
        reward_head: torch.nn.Linear | None,
        actor_full: torch.nn.Module | None,
        critic_full: torch.nn.Module | None,
        base_model_path: str,
    ) -> None:
        super().__init__()
        self.lm = lm  # PeftModel when any adapter lives on the base, else the plain frozen base
        self.adapters = adapters
        self.value_head = value_head
        self.reward_head = reward_head
        self.actor_full = actor_full
        self.critic_full = critic_full
        self.base_model_path = base_model_path
        self.logits_chunk_bytes = CHUNK_BYTES  # float32 logits of one chunk of response positions
        self._trainable = self._collect_trainable()
        self._restore_requires_grad()

    # -- adapter switching ---------------------------------------------------------------------------
    def _collect_trainable(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"actor": []}
        if self.value_head is not None:  # a critic: adapter or full copy, plus the value head
            groups["critic"] = []
        for name, param in self.named_parameters():
            if name.startswith("actor_full."):
                groups["actor"].append((name, param))
            elif name.startswith(("critic_full.", "value_head.")):
                groups["critic"].append((name, param))
            elif ".lora_" in name and (".actor." in name or name.endswith(".actor")):
                groups["actor"].append((name, param))
            elif ".lora_" in name and (".critic." in name or name.endswith(".critic")):
                groups["critic"].append((name, param))
        return groups

    def _restore_requires_grad(self) -> None:
        """PEFT's set_adapter/disable_adapter flip requires_grad; trainability is ours to decide."""
        trainable = {id(p) for group in self._trainable.values() for _, p in group}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    @contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        """Run the shared base with adapter ``name`` active, or with all adapters off (``None``)."""
        if not isinstance(self.lm, PeftModel):
            yield
            return
        try:
            if name is None:
                with self.lm.disable_adapter():
                    yield
            else:
                self.lm.set_adapter(name)
                yield
        finally:
            self._restore_requires_grad()

    def _actor(self) -> tuple[torch.nn.Module, Any]:
        if self.actor_full is not None:
            return self.actor_full, nullcontext()
        return self.lm, self._adapter("actor")

    # -- forward passes --------------------------------------------------------------------------------
    # Log-probs come from the decoder body's hidden states and the LM head applied to a few response
    # positions at a time (rlhf/ppo/token_logprobs.py): no [B, R, V] float32 logits. The pretraining loss
    # likewise goes through the chunked linear cross-entropy of rlhf/training/fused_loss.py.
    @staticmethod
    def _plain_head(model: torch.nn.Module) -> torch.nn.Module | None:
        """The output layer when the logits are exactly ``lm_head(hidden)``; ``None`` when the family
        transforms them further (logit soft-capping or scaling): then the model's own forward runs."""
        config = model.config
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
            return None
        return model.get_output_embeddings()

    @staticmethod
    def _response_logits(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
        """Full-vocabulary logits that predict each response token: positions P-1 .. T-2. -> [B, R, V]"""
        response_len = batch.input_ids.shape[1] - batch.prompt_len
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=response_len + 1,
            use_cache=False,
        )
        return out.logits[:, :-1]

    @staticmethod
    def _hidden(
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states of the decoder body, adapters as they are set (no LM head). [B, T] -> [B, T, H]"""
        backbone = model.get_base_model() if isinstance(model, PeftModel) else model
        out = backbone.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def _batch_hidden(self, model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
        return self._hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)

    def _response_logprobs(
        self,
        model: torch.nn.Module,
        batch: SequenceBatch,
        temperature: float,
        with_entropy: bool,
        entropy_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π of each response token [B, R] (and its entropy [B, R]) under ``model`` as it is set."""
        head = self._plain_head(model)
        if head is None:
            logits = self._response_logits(model, batch)
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = entropy_from_logits(logits, temperature) if with_entropy else None
            return logprobs_from_logits(logits, batch.response_ids, temperature), entropy
        hidden = self._batch_hidden(model, batch)[:, batch.prompt_len - 1 : -1]  # [B, R, H]
        chunk = positions_per_chunk(hidden.shape[0], model.config.vocab_size, self.logits_chunk_bytes)
        return chunked_token_logprobs(
            head, hidden, batch.response_ids, temperature, chunk, with_entropy, self._recompute_context,
            entropy_grad,
        )  # fmt: skip

    def policy_logprobs(
        self, batch: SequenceBatch, temperature: float, with_entropy: bool = False, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        model, active = self._actor()
        with active:
            return self._response_logprobs(model, batch, temperature, with_entropy, entropy_grad)

    @torch.no_grad()
    def reference_logprobs(self, batch: SequenceBatch, temperature: float) -> torch.Tensor:
        with self._adapter(None):
            return self._response_logprobs(self.lm, batch, temperature, with_entropy=False)[0]

    @staticmethod
    def _float32_head(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        """A scalar head (value or reward) in float32, also under --bf16/--fp16 autocast: [..., H] -> [...].

        Autocast would run it in half precision, rounding every value and score to about 3 significant
        digits: in GAE that noise is larger than a token's KL penalty, and equal rewards in a group tie.
        """
        with torch.autocast(hidden.device.type, enabled=False):
            return head(hidden.float()).squeeze(-1)

    def critic_token_values(self, batch: SequenceBatch) -> torch.Tensor:
        """Value head on every position's hidden state. -> [B, T]"""
        if self.value_head is None:
            raise ValueError("this models bundle has no critic (a critic-free --advantage_estimator)")
        if self.critic_full is not None:
            hidden = self._batch_hidden(self.critic_full, batch)
        else:
            with self._adapter("critic"):
                hidden = self._batch_hidden(self.lm, batch)
        return self._float32_head(self.value_head, hidden)

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        return self.critic_token_values(batch)[:, batch.prompt_len - 1 : -1]

    @torch.no_grad()
    def reward_scores(self, batch: SequenceBatch) -> torch.Tensor | None:
        if self.reward_head is None:
            return None
        with self._adapter("reward"):
            hidden = self._batch_hidden(self.lm, batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, batch.last_token_positions]
        return self._float32_head(self.reward_head, last)

    def pretrain_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the actor on [B, L] blocks, by the chunked linear cross-entropy
        (liger's fused kernel on CUDA when installed) when the LM head is a plain Linear."""
        model, active = self._actor()
        with active:
            projection = output_projection(model) if self._plain_head(model) is not None else None
            if projection is None:
                return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            implementation = resolve_implementation("auto", input_ids.device.type)
            hidden = self._hidden(model, input_ids)
            return linear_cross_entropy(hidden, *projection, input_ids, implementation=implementation)

    # -- activation checkpointing ---------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every decoder layer (non-reentrant) of the shared base and of full copies, so the
        actor and critic updates keep one hidden state per layer instead of all activations.

        Only forwards with gradients in training mode checkpoint (the updates); rollout forwards run as they
        are. A layer is recomputed in the backward under the adapter that was active in its forward, even
        when another adapter has been set in between (e.g. actor and critic losses in one backward).
        """
        for model in self._decoders():
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            kwargs = {"use_reentrant": False, "context_fn": self._recompute_context}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            # config.use_cache stays as it is: every forward here passes use_cache=False itself, and a full
            # copy's config.json is saved from it (a False there would stop users' forwards from caching)
        logger.info("gradient checkpointing: every decoder layer of the actor and critic (non-reentrant)")

    def compile_layers(self, backend: str) -> None:
        """``--torch_compile``: the decoder layers of the shared base and of full copies run one compiled
        forward per model class (:func:`rlhf.models.regional_compile.compile_decoder_layers`)."""
        for model in self._decoders():
            compile_decoder_layers(model, backend)

    def _decoders(self) -> list[torch.nn.Module]:
        """The shared base (PEFT-wrapped or not) and the full copies the bundle holds."""
        return [m for m in (self.lm, self.actor_full, self.critic_full) if m is not None]

    def _recompute_context(self) -> tuple[Any, Any]:
        """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: (forward context, recompute context)."""
        if not isinstance(self.lm, PeftModel):
            return nullcontext(), nullcontext()
        return nullcontext(), self._adapter_as(self.lm.active_adapter)

    @contextmanager
    def _adapter_as(self, name: str) -> Iterator[None]:
        """Set adapter ``name`` for a layer's recompute when another one is active now; put it back after."""
        current = self.lm.active_adapter
        if current == name:
            yield
            return
        self.lm.set_adapter(name)
        try:
            yield
        finally:
            self.lm.set_adapter(current)
            self._restore_requires_grad()

    @contextmanager
    def generation_model(self) -> Iterator[Any]:
        model, active = self._actor()
        with active:
            yield model

    # -- saving (parameter groups and trainable state: TrainableGroups) ---------------------------------
    def _save_adapter(self, name: str, directory: Path) -> None:
        config = copy.deepcopy(self.lm.peft_config[name])
        config.base_model_name_or_path = recorded_base_path(self.base_model_path)
        config.inference_mode = True
        config.save_pretrained(str(directory))
        state = get_peft_model_state_dict(self.lm, adapter_name=name)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))

    def adapter_settings(self) -> dict[str, Any]:
        """The LoRA scaling of the trained adapters (``--actor_lora_alpha``, ``--critic_lora_alpha``, the
        critic's as copied from the reward adapter): a changed alpha would silently rescale a resumed adapter."""
        if not isinstance(self.lm, PeftModel):
            return {}
        return {
            f"{name}_lora_alpha": self.lm.peft_config[name].lora_alpha
            for name in ("actor", "critic") if name in self.lm.peft_config
        }  # fmt: skip

    @property
    def has_adapters(self) -> bool:
        """Whether anything is saved as an adapter (its config then names ``base_model_path``)."""
        return isinstance(self.lm, PeftModel) and bool({"actor", "critic"} & set(self.lm.peft_config))

    @staticmethod
    @contextmanager
    def _published(directory: Path) -> Iterator[Path]:
        """A staging dir to save a model into; its files then replace the model in ``directory`` one rename
        each, and an earlier model's files they do not replace are removed (:func:`publish_model_files`)."""
        staging = staging_dir(directory)
        yield staging
        publish_model_files(staging, directory)

    def save_actor(self, directory: Path) -> None:
        with self._published(directory) as staging:
            if self.actor_full is not None:
                self.actor_full.save_pretrained(str(staging), safe_serialization=True)
            else:
                self._save_adapter("actor", staging)

    def save_critic(self, directory: Path) -> None:
        if self.value_head is None:
            raise ValueError("this models bundle has no critic to save")
        with self._published(directory) as staging:
            if self.critic_full is not None:
                self.critic_full.save_pretrained(str(staging), safe_serialization=True)
            else:
                self._save_adapter("critic", staging)
            save_file({"weight": self.value_head.weight.detach().contiguous()}, str(staging / VALUE_HEAD))


def _target_names(targets: Any) -> list[str]:
    """A LoraConfig's ``target_modules`` (a set, a list or one name) as a list of names."""
    return [targets] if isinstance(targets, str) else list(targets or [])


def _merge_lora_copy(base: torch.nn.Module, adapter: RewardAdapter) -> torch.nn.Module:
    """A full copy of ``base`` with the reward LoRA merged in (a full-parameter critic from the RM)."""
    peft = get_peft_model(copy.deepcopy(base), copy.deepcopy(adapter.config), adapter_name="merge")
    set_peft_model_state_dict(peft, adapter.lora_state, adapter_name="merge")
    return peft.merge_and_unload()


def build_peft_policy_models(
    sft_model_path: str,
    *,
    actor: LoraSpec,
    critic: LoraSpec | None,
    reward_adapter: RewardAdapter | None,
    critic_init: str,
    torch_dtype: str = "auto",
    model_type: str | None = None,
    trust_remote_code: bool = False,
) -> PeftPolicyModels:
    """Load the base once, freeze it, and attach the actor, critic and (shared) reward adapters.

    ``reward_adapter`` is given only when it was trained on this same base. With ``critic_init="reward"``
    and a reward adapter the critic starts as a copy of it (LoRA weights and score head). ``critic=None``
    builds no critic at all (no adapter, no copy, no value head): the critic-free estimators.
    """
    base = load_causal_lm(
        sft_model_path,
        flag="--sft_model_path",
        torch_dtype=torch_dtype,
        model_type=model_type,
        trust_remote_code=trust_remote_code,
        merge_adapter=True,
    )
    base.requires_grad_(False)
    use_fused_rms_norm(base)  # one F.rms_norm per norm (a fused kernel each way on CUDA), copies included
    hidden = base.config.hidden_size
    from_reward = critic_init == "reward" and reward_adapter is not None
    actor_full = copy.deepcopy(base).requires_grad_(True) if not actor.use_lora else None
    critic_full = None
    if critic is not None and not critic.use_lora:
        critic_full = _merge_lora_copy(base, reward_adapter) if from_reward else copy.deepcopy(base)
        critic_full.requires_grad_(True)

    configs: dict[str, LoraConfig] = {}
    if actor.use_lora:
        configs["actor"] = build_lora_config(
            base, rank=actor.rank, alpha=actor.alpha, dropout=actor.dropout, targets=actor.targets,
            flag="--actor_lora_target",
        )  # fmt: skip
    if critic is not None and critic.use_lora:
        configs["critic"] = build_lora_config(
            base, rank=critic.rank, alpha=critic.alpha, dropout=critic.dropout, targets=critic.targets,
            flag="--critic_lora_target",
        )  # fmt: skip
        if from_reward:
            wanted = reward_adapter.config
            logger.info(
                "critic adapter starts from the reward adapter (r=%d, alpha=%s)", wanted.r, wanted.lora_alpha
            )
            configs["critic"] = copy.deepcopy(wanted)
            configs["critic"].lora_dropout = critic.dropout
            configs["critic"].inference_mode = False
            ours = (critic.rank, critic.alpha, sorted(critic.targets))
            theirs = (wanted.r, wanted.lora_alpha, sorted(_target_names(wanted.target_modules)))
            differ = [flag for flag, a, b in zip(("rank", "alpha", "target"), ours, theirs) if a != b]
            if differ:
                logger.warning(
                    "--critic_lora_%s replaced by the reward adapter's (r=%d, alpha=%s, targets %s) to copy it "
                    "exactly", "/".join(differ), wanted.r, wanted.lora_alpha, ",".join(theirs[2]),
                )  # fmt: skip
    if reward_adapter is not None:
        configs["reward"] = reward_adapter.config

    lm: torch.nn.Module = base
    names = list(configs)
    if names:
        lm = get_peft_model(base, configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            lm.add_adapter(name, configs[name])
        use_fast_lora_forward(lm)  # no float32 round trip of the input under autocast, one addmm
    if reward_adapter is not None:
        set_peft_model_state_dict(lm, reward_adapter.lora_state, adapter_name="reward")
        if from_reward and critic is not None and critic.use_lora:
            set_peft_model_state_dict(lm, reward_adapter.lora_state, adapter_name="critic")

    value_head = torch.nn.Linear(hidden, 1, bias=False) if critic is not None else None
    reward_head = None
    if reward_adapter is not None:
        reward_head = torch.nn.Linear(hidden, 1, bias=False).requires_grad_(False)
        reward_head.weight.data.copy_(reward_adapter.score_weight)
    if value_head is not None and from_reward:
        value_head.weight.data.copy_(reward_adapter.score_weight)
    elif value_head is not None:
        torch.nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
    return PeftPolicyModels(lm, names, value_head, reward_head, actor_full, critic_full, sft_model_path)
