"""The Accelerate + PEFT factory of a PPO session (``run_ppo_with_peft.py``).

It builds what is specific to this backend — :class:`rlhf.backend.accelerate.AccelerateBackend`, the PEFT
models bundle (:class:`rlhf.ppo.peft_models.PeftPolicyModels`: one frozen base with ``actor``/``critic``/
``reward`` adapters), the reward (shared adapter, separate model, rule, or a sum) and the rollout
generator (``--generation_engine``) — loads the prompts and pretraining blocks, and hands them to the
backend-neutral :func:`rlhf.ppo.session.assemble_session`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import set_seed

from rlhf.args import DataArguments, split_comma_list
from rlhf.backend.accelerate import AccelerateBackend
from rlhf.launch_settings import launched_precision
from rlhf.models import adapter_base_path, load_tokenizer
from rlhf.models.adapter_base import merged_from_adapter, write_base_if_adapter_source
from rlhf.models.loading import warn_precision_fallback
from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import (
    PPOArguments,
    PPOModelArguments,
    PPOTrainingArguments,
    critic_output_dir,
    input_paths,
)
from rlhf.ppo.data import hold_out_prompts, load_pretrain, load_prompts
from rlhf.ppo.loop import PPOSession
from rlhf.ppo.peft_models import PeftPolicyModels, build_peft_policy_models, read_reward_adapter
from rlhf.ppo.rewards import (
    AdapterScorer,
    RuleScorer,
    Scorer,
    SequenceClassifierScorer,
    SumScorer,
    load_reward_fn,
)
from rlhf.ppo.session import SessionParts, assemble_session, rollout_generator, warn_beyond_context
from rlhf.reward.model import load_reward_model

logger = logging.getLogger(__name__)


def launch_precision(args: PPOTrainingArguments) -> str:
    """``--fp16``/``--bf16``, else the mixed precision ``accelerate launch`` asked for (its config file's
    ``mixed_precision:`` or ``--mixed_precision``, passed on as ``ACCELERATE_MIXED_PRECISION``), as the
    Trainer stages take it; half precision without a GPU is float32, with the one fallback warning."""
    if args.fp16 or args.bf16:
        return "fp16" if args.fp16 else "bf16"
    launched = launched_precision()
    if launched == "no":
        return "no"
    if not torch.cuda.is_available():
        warn_precision_fallback([f"mixed_precision: {launched} (from accelerate launch)"])
        return "no"
    logger.info("mixed precision %s, from accelerate launch (its config or --mixed_precision)", launched)
    return launched


def actor_lora_spec(margs: PPOModelArguments) -> LoraSpec:
    """The actor's adapter from ``--actor_lora_*`` (a bad alpha or dropout is an error naming those flags)."""
    return LoraSpec(
        margs.actor_lora_rank, margs.actor_lora_alpha, margs.actor_lora_dropout,
        split_comma_list(margs.actor_lora_target), flag_prefix="--actor_lora_",
    )  # fmt: skip


def critic_lora_spec(margs: PPOModelArguments) -> LoraSpec:
    """The critic's adapter from ``--critic_lora_*``."""
    return LoraSpec(
        margs.critic_lora_rank, margs.critic_lora_alpha, margs.critic_lora_dropout,
        split_comma_list(margs.critic_lora_target), flag_prefix="--critic_lora_",
    )  # fmt: skip


def build_backend(args: PPOTrainingArguments) -> AccelerateBackend:
    return AccelerateBackend(launch_precision(args), args.ddp_timeout, args.report_to_list, args.output_dir)


def reward_adapter_shares_base(reward_lora_path: str, sft_model_path: str) -> bool:
    """True when the reward adapter was trained on ``sft_model_path`` itself, or on the base the reward stage
    wrote from that same adapter dir (``--sft_model_path`` an SFT adapter dir that the reward model was also
    trained on: :func:`rlhf.models.adapter_base.merged_from_adapter`), or when its base is not on this
    machine (it is then assumed to be, and a warning says so)."""
    base = adapter_base_path(reward_lora_path)
    if Path(base).resolve() == Path(sft_model_path).resolve():
        return True
    if merged_from_adapter(base, sft_model_path):
        logger.info(
            "reward adapter %s was trained on %s, the SFT adapter %s merged into its base: the same model as "
            "--sft_model_path, so it is shared", reward_lora_path, base, sft_model_path,
        )  # fmt: skip
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
    model = load_reward_model(path, torch_dtype=margs.torch_dtype, trust_remote_code=margs.trust_remote_code)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.requires_grad_(False)


def build_models_and_scorer(
    margs: PPOModelArguments,
    tokenizer: Any,
    backend: AccelerateBackend,
    with_critic: bool = True,
    chats: dict[str, list[dict[str, str]]] | None = None,
) -> tuple[PeftPolicyModels, Scorer]:
    """The PEFT models bundle and the reward: shared reward adapter, separate reward model, rule, or a sum.
    ``with_critic=False`` (a critic-free ``--advantage_estimator``) builds no critic. ``chats``: the
    prompts' conversations by rendered text (:class:`rlhf.ppo.data.PromptSet`), for a separate reward
    model with its own chat template."""
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
    if with_critic and margs.critic_init == "reward" and shared_adapter is None:
        (logger.warning if margs.reward_lora_path else logger.info)(
            "--critic_init reward: the critic starts from the SFT model instead (no reward adapter on the "
            "same base as --sft_model_path to copy)"
        )
    models = build_peft_policy_models(
        margs.sft_model_path,
        actor=actor_lora_spec(margs),
        critic=critic_lora_spec(margs) if with_critic else None,
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
        same_text = rm_tokenizer.get_vocab() == tokenizer.get_vocab() and (
            not chats
            or getattr(rm_tokenizer, "chat_template", None) == getattr(tokenizer, "chat_template", None)
        )  # else its stage saw other ids or another rendering of a chat: the text is tokenized again
        if not same_text:
            logger.info(
                "reward model %s: its own tokenizer%s; prompts and responses are tokenized again for it",
                separate_path, " and chat template" if chats else "",
            )  # fmt: skip
        model = _separate_reward_model(separate_path, margs)
        scorers.append(
            SequenceClassifierScorer(
                model,
                backend.device,
                None if same_text else rm_tokenizer,
                reward_eos=rm_tokenizer.eos_token_id,
                chats=chats,
            )
        )
    if margs.reward_fn:
        scorers.append(RuleScorer(load_reward_fn(margs.reward_fn), margs.reward_fn))
    return models, scorers[0] if len(scorers) == 1 else SumScorer(scorers)


def build_peft_session(
    data: DataArguments, margs: PPOModelArguments, ppo: PPOArguments, args: PPOTrainingArguments
) -> PPOSession:
    """Flags -> the session of ``run_ppo_with_peft.py``."""
    backend = build_backend(args)
    set_seed(args.seed)  # identical model initialisation on every process
    tokenizer = load_tokenizer(margs.sft_model_path, margs.trust_remote_code, padding_side="left")
    # the data before the models: an error in it comes before minutes of loading
    show_progress = backend.is_main and not args.disable_tqdm
    prompts = load_prompts(
        data.dataset_dir, tokenizer, ppo.max_prompt_length, data.data_cache_dir, show_progress
    )
    eval_prompts = None
    if args.do_eval:
        prompts, eval_prompts = hold_out_prompts(prompts, data.split_ratio, args.seed)
    pretrain = None
    if margs.pretrain_dataset_dir:
        pretrain = load_pretrain(margs.pretrain_dataset_dir, tokenizer, data.block_size, data.data_cache_dir)
    models, scorer = build_models_and_scorer(
        margs, tokenizer, backend, with_critic=ppo.needs_critic, chats=prompts.chats
    )
    if models.has_adapters:  # an adapter dir as --sft_model_path: the base the saved adapters name, on disk
        critic_dir = [critic_output_dir(margs, args)] if ppo.needs_critic else []  # its adapter names it too
        base = write_base_if_adapter_source(
            models.lm,
            margs.sft_model_path,
            args.output_dir,
            tokenizer,
            backend.is_main,
            also_named_in=critic_dir,
        )
        if base is not None:
            models.base_model_path = str(base)
    warn_beyond_context(getattr(models.lm.config, "max_position_embeddings", None), prompts, pretrain, ppo)
    parts = SessionParts(
        backend=backend, models=models, scorer=scorer, tokenizer=tokenizer, prompts=prompts, pretrain=pretrain,
        generator=rollout_generator(ppo, args, models.generation_model, tokenizer),
        save_extra={"tokenizer": lambda path: tokenizer.save_pretrained(str(path))},
        inputs=input_paths(margs, data.dataset_dir), eval_prompts=eval_prompts,
    )  # fmt: skip
    return assemble_session(parts, ppo, args, {**vars(margs), **vars(ppo), **vars(args)})
