"""Backend-neutral assembly of a PPO session: what every backend shares once its factory built the rest.

A backend factory builds what depends on the backend — the backend itself, the models bundle
(:class:`rlhf.ppo.policy_interface.PolicyModels`), the reward scorer, the generator — and loads the data;
it hands them over as :class:`SessionParts` to :func:`assemble_session`, which adds what does not depend
on the backend: data samplers sharded over the data-parallel replicas, the optimizer-step count, AdamW
optimizers and schedules per model, the KL controller, the trackers, and the per-replica sampling seed.

Factories: :func:`rlhf.ppo.peft_factory.build_peft_session` (Accelerate + PEFT, ``run_ppo_with_peft.py``)
and :func:`rlhf.tp.ppo_factory.build_tp_session` (tensor parallel, ``-m rlhf.tp.ppo_train``). A new
backend (or another generation engine) plugs in by building its own parts; a critic-free
``--advantage_estimator`` is a models bundle without a critic (``has_critic`` False: no critic optimizer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.backend import Backend
from rlhf.data.sequences import warn_beyond_context as warn_sequence_beyond_context
from rlhf.errors import ConfigError, DataError
from rlhf.generation.base import Generator, SamplingConfig, eos_ids, stop_ids
from rlhf.generation.build import build_generator
from rlhf.models.rope import HOST_ROPE, rope_type
from rlhf.optimizer import build_adamw
from rlhf.ppo.config import (
    PPOArguments,
    PPOTrainingArguments,
    check_kl_horizon,
    off_policy_reason,
    rollout_size,
)
from rlhf.ppo.data import EpochSampler, PromptSet
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController
from rlhf.ppo.loop import PPOSession
from rlhf.ppo.policy_interface import PolicyModels
from rlhf.ppo.rewards import AdapterScorer, Scorer, SequenceClassifierScorer

TRACKER_PROJECT = "rlhf-ppo"

logger = logging.getLogger(__name__)


@dataclass
class SessionParts:
    """What a backend factory builds for :func:`assemble_session`.

    ``tokenizer`` decodes responses (``batch_decode``) and gives the pad / EOS ids; ``pretrain`` holds the
    pretraining blocks [N, block_size] of the PPO-ptx loss, or ``None``; ``save_extra`` maps a name to a
    writer(path) the checkpoints and final outputs also run (e.g. the tokenizer's ``save_pretrained``).
    """

    backend: Backend
    models: PolicyModels
    scorer: Scorer
    generator: Generator
    tokenizer: Any
    prompts: PromptSet
    pretrain: torch.Tensor | None = None
    save_extra: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)  # flag -> the path it read (resume checks)
    eval_prompts: PromptSet | None = None  # --do_eval: prompts held out from ``prompts``


def count_total_steps(
    num_prompts: int, ppo: PPOArguments, args: PPOTrainingArguments, world: int, quiet: bool = False
) -> int:
    """Optimizer steps of the run: ``--max_steps``, else ``--num_train_epochs`` over the prompts (``quiet``:
    an early check, the count's warning left to the session's own call)."""
    if args.max_steps > 0:
        return args.max_steps
    generation_batches = num_prompts // (args.per_device_train_batch_size * world)
    rollouts = math.floor(args.num_train_epochs * generation_batches / ppo.rollout_batches)
    if rollouts < 1:
        raise DataError(
            f"{num_prompts} prompts make no full rollout of --rollout_batches {ppo.rollout_batches} x "
            f"--per_device_train_batch_size {args.per_device_train_batch_size} prompts on {world} process(es) "
            f"over --num_train_epochs {args.num_train_epochs:g}: lower them, or give more prompts"
        )
    per_rollout = ppo.ppo_epochs * rollout_size(ppo, args)
    mini_batches = rollouts * per_rollout // ppo.per_device_mini_train_batch_size
    if mini_batches < args.gradient_accumulation_steps and not quiet:  # one step needs more rollouts
        needed = math.ceil(
            args.gradient_accumulation_steps * ppo.per_device_mini_train_batch_size / per_rollout
        )
        logger.warning(
            "--num_train_epochs %g makes %d rollout(s), %d mini-batch(es) in all, fewer than one optimizer step's "
            "--gradient_accumulation_steps %d: the run trains 1 step, on %d rollouts (more passes over the "
            "prompts than asked); lower --gradient_accumulation_steps or give --max_steps",
            args.num_train_epochs, rollouts, mini_batches, args.gradient_accumulation_steps, needed,
        )  # fmt: skip
    return max(1, mini_batches // args.gradient_accumulation_steps)


def warn_beyond_context(
    context: int | None,
    prompts: PromptSet,
    pretrain: torch.Tensor | None,
    ppo: PPOArguments,
    response_flag: str = "--max_response_length",
) -> None:
    """SFT's warning line (:func:`rlhf.data.sequences.warn_beyond_context`) when the longest prompt plus
    ``--max_response_length`` new tokens, or a pretraining block, is longer than the model's ``context``
    positions (``response_flag``: the stage's name for the response budget)."""
    longest = max(map(len, prompts.ids), default=0) + ppo.max_response_length
    budget = ppo.max_prompt_length + ppo.max_response_length
    warn_sequence_beyond_context(longest, context, f"--max_prompt_length + {response_flag}", budget)
    if pretrain is not None:
        warn_sequence_beyond_context(pretrain.shape[1], context, "--block_size", pretrain.shape[1])


def build_optimizers(
    models: PolicyModels, ppo: PPOArguments, args: PPOTrainingArguments, total_steps: int
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """AdamW per model with its own learning rate and schedule (``--actor_lr``, ``--critic_lr``): one for
    the actor, one for the critic when the bundle has one."""
    rates = {"actor": ppo.actor_lr, "critic": ppo.critic_lr}
    optimizers, schedulers = {}, {}
    for name, params in models.parameter_groups().items():
        if not params:
            raise ConfigError(f"the {name} has no trainable parameters")
        optimizers[name], schedulers[name] = build_adamw(
            params, lr=rates[name], weight_decay=args.weight_decay, scheduler=args.lr_scheduler_type,
            warmup=args.warmup_steps, total_steps=total_steps,
        )  # fmt: skip
    return optimizers, schedulers


def build_kl_controller(
    ppo: PPOArguments, samples_per_rollout: int
) -> FixedKLController | AdaptiveKLController:
    """β fixed at ``--kl_penalty_beta``, or adaptive towards ``--target_kl`` when it is set.
    ``samples_per_rollout``: over all processes, the ``n`` of the controller's update."""
    if ppo.target_kl is None:
        return FixedKLController(ppo.kl_penalty_beta)
    check_kl_horizon(ppo, samples_per_rollout)
    return AdaptiveKLController(ppo.kl_penalty_beta, ppo.target_kl, ppo.kl_horizon)


def sampling_config(ppo: PPOArguments, tokenizer: Any, model_eos: Any = None) -> SamplingConfig:
    """The rollout's sampling settings from the PPO flags and the tokenizer's EOS / pad ids. ``model_eos``:
    the model's ``generation_config.eos_token_id`` (one id or a list: a chat model's end-of-turn tokens),
    whose ids also end a response, as they do in HF ``generate`` with the model's defaults."""
    return SamplingConfig(
        max_new_tokens=ppo.max_response_length, min_new_tokens=ppo.min_response_length,
        temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
        eos_token_id=stop_ids(tokenizer.eos_token_id, model_eos), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def rollout_generator(
    ppo: PPOArguments,
    args: PPOTrainingArguments,
    generation_model: Any,
    tokenizer: Any,
    model_eos: Any = None,
) -> Generator:
    """The rollout generator for ``--generation_engine`` (:func:`rlhf.generation.build.build_generator`).

    ``generation_model()`` yields the actor to sample from (``--generation_lora merged``: from a merged copy
    of its weights, :mod:`rlhf.generation.merged_decoder`). The static engine's KV cache holds one
    generation batch (``--per_device_train_batch_size`` x ``--num_samples_per_prompt`` rows) of
    ``--max_prompt_length`` + ``--max_response_length`` tokens; it samples from the global torch RNG, as HF
    ``generate`` does, so a checkpoint's RNG state resumes the sampling exactly. ``model_eos``: the
    ``generation_config.json`` EOS ids of a model that keeps none of its own (the tensor-parallel one); by
    default an HF model's ``generation_config``'s.
    """
    if model_eos is None:
        with generation_model() as model:  # an HF model's generation_config may list more EOS ids
            model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    sampling = sampling_config(ppo, tokenizer, model_eos)
    if len(eos_ids(sampling.eos_token_id)) > 1:
        logger.info("a response ends at any of the EOS ids %s (tokenizer + generation_config.json)",
                    list(eos_ids(sampling.eos_token_id)))  # fmt: skip
    return build_generator(
        ppo.generation_engine, generation_model, sampling,
        max_prompt_length=ppo.max_prompt_length,
        max_batch_size=args.per_device_train_batch_size * ppo.num_samples_per_prompt,
        merge_lora=ppo.generation_lora == "merged",
        **({"compile_backend": "inductor"} if ppo.generation_compile else {}),
    )  # fmt: skip


def old_logprobs_source(
    ppo: PPOArguments, args: PPOTrainingArguments, models: PolicyModels, backend: Backend
) -> str:
    """``--old_logprobs`` resolved: where the rollout's old log-probs come from, ``generator``,
    ``forward`` or ``update``.

    ``auto``: ``update`` where the update is on-policy (:func:`rlhf.ppo.config.off_policy_reason`): the
    update's own forward, detached, as TRL's GRPOTrainer does, no forward for them in the rollout. Else
    ``generator`` in float32, where the generator's decode path and the update's forward agree to about
    1e-6; ``forward`` under bf16/fp16 weights or autocast, where they differ by half-precision rounding
    (different kernels, a KV cache, merged weights): the first mini-batch's ratio would not be 1 and the KL
    to the reference (a training forward) not 0 at the start, so an eval forward of the actor computes them.
    """
    if ppo.old_logprobs != "auto":
        return ppo.old_logprobs
    if off_policy_reason(ppo, args) is None:
        logger.info(
            "old log-probs: the update's own forward, detached (--old_logprobs auto: one epoch, no optimizer "
            "step inside a rollout, no KL in the reward)"
        )
        return "update"
    with backend.autocast(), models.generation_model() as model:
        autocast = torch.is_autocast_enabled(backend.device.type)
        dtype = next(model.parameters()).dtype
        rope = rope_type(model)
    # dynamic / longrope RoPE rescale with the longest position seen: the decode steps rotated early keys
    # with a smaller scaling than one forward over the whole sequence uses (log-probs differ by ~1e-2)
    position_dependent = any(kind in rope for kind in HOST_ROPE)
    from_generator = not autocast and dtype == torch.float32 and not position_dependent
    logger.info(
        "old log-probs: %s (--old_logprobs auto)",
        "the generator's (float32)" if from_generator
        else f"an eval forward of the actor ({rope} RoPE: the decode steps scale positions differently)"
        if position_dependent
        else f"an eval forward of the actor ({'autocast' if autocast else dtype}: the generator rounds differently)",
    )  # fmt: skip
    return "generator" if from_generator else "forward"


def assemble_session(
    parts: SessionParts, ppo: PPOArguments, args: PPOTrainingArguments, flags: dict[str, Any]
) -> PPOSession:
    """The session the loop runs: ``parts`` plus samplers, step count, optimizers, KL controller.

    Starts the trackers with ``flags`` (every flag of the run) as their configuration, then seeds torch
    with ``--seed`` + the replica index, so data-parallel replicas sample different responses while the
    tensor-parallel ranks of one replica stay in lockstep. Call it after the models are built (their
    initialisation uses the plain ``--seed`` on every process).
    """
    backend = parts.backend
    if parts.models.has_critic != ppo.needs_critic:
        raise ValueError(
            f"--advantage_estimator {ppo.advantage_estimator} needs a models bundle "
            f"{'with' if ppo.needs_critic else 'without'} a critic"
        )
    world, replica = backend.world_size, backend.replica_rank
    batch = args.per_device_train_batch_size
    prompt_sampler = EpochSampler(
        len(parts.prompts),
        batch,
        world,
        replica,
        args.seed,
        what=f"prompts of {parts.prompts.source} (--per_device_train_batch_size)",
    )
    pretrain_sampler = None
    if parts.pretrain is not None:
        pretrain_sampler = EpochSampler(
            len(parts.pretrain), ppo.pretrain_batch_size, world, replica, args.seed,
            what="pretraining blocks (--pretrain_dataset_dir cut into --block_size tokens, --pretrain_batch_size)",
        )  # fmt: skip
    total_steps = count_total_steps(len(parts.prompts), ppo, args, world)
    if args.gradient_checkpointing:
        parts.models.enable_gradient_checkpointing()
    if args.torch_compile:
        parts.models.compile_layers(args.torch_compile_backend)
    optimizers, schedulers = build_optimizers(parts.models, ppo, args, total_steps)
    with backend.autocast():  # the cache takes the dtype the rollouts will compute in
        parts.generator.prepare()
    policy_eos = eos_ids(parts.generator.sampling.eos_token_id)
    if not policy_eos and ppo.missing_eos_penalty is not None:
        raise ConfigError(
            f"--missing_eos_penalty {ppo.missing_eos_penalty}: the tokenizer and the model name no EOS token, so "
            "no response could end and every one would be penalised"
        )
    for scorer in getattr(parts.scorer, "scorers", [parts.scorer]):
        if isinstance(scorer, (SequenceClassifierScorer, AdapterScorer)):  # an ended response ends on its EOS
            scorer.policy_eos = policy_eos
            if scorer.reward_eos is None:
                scorer.reward_eos = parts.tokenizer.eos_token_id
    old_logprobs = old_logprobs_source(ppo, args, parts.models, backend)
    backend.init_trackers(TRACKER_PROJECT, flags | {"run_name": args.run_name})
    torch.manual_seed(args.seed + replica)
    tokenizer = parts.tokenizer
    return PPOSession(
        models=parts.models, generator=parts.generator, scorer=parts.scorer, backend=backend,
        decode=tokenizer.batch_decode, prompts=parts.prompts, prompt_sampler=prompt_sampler,
        pretrain=parts.pretrain, pretrain_sampler=pretrain_sampler, optimizers=optimizers,
        schedulers=schedulers, kl_controller=build_kl_controller(ppo, rollout_size(ppo, args) * world), ppo=ppo, args=args,
        total_steps=total_steps, pad_token_id=tokenizer.pad_token_id, eos_token_id=parts.generator.sampling.eos_token_id,
        estimator=ppo.estimator_settings(), save_extra=parts.save_extra,
        old_logprobs=old_logprobs, inputs=parts.inputs, eval_prompts=parts.eval_prompts,
    )  # fmt: skip
