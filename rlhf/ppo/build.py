"""Construction for the PPO stage: backend, tokenizer, models, reward, generator, data, optimizers.

Each ``build_*`` function turns flags into one component, so :func:`rlhf.ppo.loop.train` sees only
finished objects.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, get_scheduler, set_seed

from rlhf.args import DataArguments, split_comma_list
from rlhf.backend.accelerate import AccelerateBackend
from rlhf.errors import ConfigError, DataError
from rlhf.generation import HFGenerator, SamplingConfig
from rlhf.models import adapter_base_path, is_adapter_dir, load_tokenizer, resolve_dtype
from rlhf.ppo.config import PPOArguments, PPOModelArguments, PPOTrainingArguments
from rlhf.ppo.data import EpochSampler, load_pretrain, load_prompts
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController
from rlhf.ppo.loop import PPOSession
from rlhf.ppo.peft_models import LoraSpec, PeftPolicyModels, build_peft_policy_models, read_reward_adapter
from rlhf.ppo.rewards import (
    AdapterScorer,
    RuleScorer,
    Scorer,
    SequenceClassifierScorer,
    SumScorer,
    load_reward_fn,
)

logger = logging.getLogger(__name__)


def build_backend(args: PPOTrainingArguments) -> AccelerateBackend:
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "no"
    return AccelerateBackend(precision, args.ddp_timeout, args.report_to_list, args.output_dir)


def reward_adapter_shares_base(reward_lora_path: str, sft_model_path: str) -> bool:
    """True when the reward adapter was trained on ``sft_model_path`` itself (or its base is not on this
    machine, in which case it is assumed to be and a warning says so)."""
    base = adapter_base_path(reward_lora_path)
    if Path(base).resolve() == Path(sft_model_path).resolve():
        return True
    if not Path(base).exists():
        logger.warning(
            "reward adapter %s names base %s, which is not here; loading it onto --sft_model_path %s",
            reward_lora_path, base, sft_model_path,
        )  # fmt: skip
        return True
    return False


def _separate_reward_model(path: str, margs: PPOModelArguments) -> torch.nn.Module:
    """A frozen sequence-classification model from a model dir, or an adapter dir merged onto its base."""
    base = adapter_base_path(path) if is_adapter_dir(path) else path
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=resolve_dtype(margs.torch_dtype), trust_remote_code=margs.trust_remote_code
    )
    if is_adapter_dir(path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.requires_grad_(False)


def build_models_and_scorer(
    margs: PPOModelArguments, tokenizer: Any, backend: AccelerateBackend
) -> tuple[PeftPolicyModels, Scorer]:
    """The PEFT models bundle and the reward: shared reward adapter, separate reward model, rule, or a sum."""
    shared_adapter, separate_path = None, None
    if margs.reward_lora_path:
        if reward_adapter_shares_base(margs.reward_lora_path, margs.sft_model_path):
            shared_adapter = read_reward_adapter(margs.reward_lora_path)
        else:
            separate_path = margs.reward_lora_path
            logger.info(
                "reward adapter %s was trained on %s, not on --sft_model_path; loaded as a separate frozen model",
                margs.reward_lora_path, adapter_base_path(margs.reward_lora_path),
            )  # fmt: skip
    separate_path = separate_path or margs.reward_model_path
    if margs.critic_init == "reward" and shared_adapter is None:
        logger.info("critic starts from the SFT model (no reward adapter on the same base to copy)")
    models = build_peft_policy_models(
        margs.sft_model_path,
        actor=LoraSpec(margs.actor_lora_rank, margs.actor_lora_alpha, margs.actor_lora_dropout,
                       split_comma_list(margs.actor_lora_target)),
        critic=LoraSpec(margs.critic_lora_rank, margs.critic_lora_alpha, margs.critic_lora_dropout,
                        split_comma_list(margs.critic_lora_target)),
        reward_adapter=shared_adapter,
        critic_init=margs.critic_init,
        torch_dtype=margs.torch_dtype,
        model_type=margs.model_type,
        trust_remote_code=margs.trust_remote_code,
    )  # fmt: skip
    models = backend.prepare(models)
    scorers: list[Scorer] = []
    if shared_adapter is not None:
        scorers.append(AdapterScorer(models))
    if separate_path:
        rm_tokenizer = load_tokenizer(separate_path, margs.trust_remote_code)
        same_vocab = rm_tokenizer.get_vocab() == tokenizer.get_vocab()
        model = _separate_reward_model(separate_path, margs)
        scorers.append(SequenceClassifierScorer(model, backend.device, None if same_vocab else rm_tokenizer))
    if margs.reward_fn:
        scorers.append(RuleScorer(load_reward_fn(margs.reward_fn), margs.reward_fn))
    return models, scorers[0] if len(scorers) == 1 else SumScorer(scorers)


def count_total_steps(num_prompts: int, ppo: PPOArguments, args: PPOTrainingArguments, world: int) -> int:
    """Optimizer steps of the run: ``--max_steps``, else ``--num_train_epochs`` over the prompts."""
    if args.max_steps > 0:
        return args.max_steps
    generation_batches = num_prompts // (args.per_device_train_batch_size * world)
    rollouts = math.floor(args.num_train_epochs * generation_batches / ppo.rollout_batches)
    if rollouts < 1:
        raise DataError(
            f"{num_prompts} prompts make no full rollout of {ppo.rollout_batches} x "
            f"{args.per_device_train_batch_size} prompts on {world} processes"
        )
    per_rollout = ppo.ppo_epochs * args.per_device_train_batch_size * ppo.rollout_batches
    mini_batches = rollouts * per_rollout // ppo.per_device_mini_train_batch_size
    return max(1, mini_batches // args.gradient_accumulation_steps)


def build_optimizers(
    models: PeftPolicyModels, ppo: PPOArguments, args: PPOTrainingArguments, total_steps: int
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """AdamW per model with its own learning rate and schedule (``--actor_lr``, ``--critic_lr``)."""
    warmup = args.warmup_steps
    warmup_steps = math.ceil(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    optimizers, schedulers = {}, {}
    for name, lr in (("actor", ppo.actor_lr), ("critic", ppo.critic_lr)):
        params = models.parameter_groups()[name]
        if not params:
            raise ConfigError(f"the {name} has no trainable parameters")
        optimizers[name] = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
        try:
            schedulers[name] = get_scheduler(
                args.lr_scheduler_type, optimizers[name], num_warmup_steps=warmup_steps,
                num_training_steps=total_steps,
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"--lr_scheduler_type {args.lr_scheduler_type}: {exc}") from None
    return optimizers, schedulers


def build_kl_controller(ppo: PPOArguments) -> FixedKLController | AdaptiveKLController:
    """β fixed at ``--kl_penalty_beta``, or adaptive towards ``--target_kl`` when it is set."""
    if ppo.target_kl is not None:
        return AdaptiveKLController(ppo.kl_penalty_beta, ppo.target_kl, ppo.kl_horizon)
    return FixedKLController(ppo.kl_penalty_beta)


def sampling_config(ppo: PPOArguments, tokenizer: Any) -> SamplingConfig:
    """The rollout's sampling settings from the PPO flags and the tokenizer's EOS / pad ids."""
    return SamplingConfig(
        max_new_tokens=ppo.max_response_length, min_new_tokens=ppo.min_response_length,
        temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_session(
    data: DataArguments, margs: PPOModelArguments, ppo: PPOArguments, args: PPOTrainingArguments
) -> PPOSession:
    backend = build_backend(args)
    set_seed(args.seed)  # identical model initialisation on every process
    tokenizer = load_tokenizer(margs.sft_model_path, margs.trust_remote_code, padding_side="left")
    models, scorer = build_models_and_scorer(margs, tokenizer, backend)
    prompts = load_prompts(data.dataset_dir, tokenizer, ppo.max_prompt_length, data.data_cache_dir)
    world, rank = backend.world_size, backend.rank
    prompt_sampler = EpochSampler(len(prompts), args.per_device_train_batch_size, world, rank, args.seed)
    pretrain, pretrain_sampler = None, None
    if margs.pretrain_dataset_dir:
        pretrain = load_pretrain(margs.pretrain_dataset_dir, tokenizer, data.block_size, data.data_cache_dir)
        pretrain_sampler = EpochSampler(len(pretrain), ppo.pretrain_batch_size, world, rank, args.seed)
    total_steps = count_total_steps(len(prompts), ppo, args, world)
    optimizers, schedulers = build_optimizers(models, ppo, args, total_steps)
    kl_controller = build_kl_controller(ppo)
    sampling = sampling_config(ppo, tokenizer)
    backend.init_trackers(
        "rlhf-ppo", {**vars(margs), **vars(ppo), **vars(args)} | {"run_name": args.run_name}
    )
    torch.manual_seed(args.seed + rank)  # different samples on each process
    return PPOSession(
        models=models, generator=HFGenerator(models.generation_model, sampling), scorer=scorer,
        backend=backend, decode=tokenizer.batch_decode, prompts=prompts, prompt_sampler=prompt_sampler,
        pretrain=pretrain, pretrain_sampler=pretrain_sampler, optimizers=optimizers, schedulers=schedulers,
        kl_controller=kl_controller, ppo=ppo, args=args, total_steps=total_steps,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        save_extra={"tokenizer": lambda path: tokenizer.save_pretrained(str(path))},
    )  # fmt: skip
