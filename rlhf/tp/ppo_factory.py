"""The tensor-parallel factory of a PPO session (``-m rlhf.tp.ppo_train``).

It builds what is specific to this backend — :class:`rlhf.tp.backend.TPBackend`, the TP models bundle
(:class:`rlhf.tp.ppo_models.TPPolicyModels`), the reward (the verifier and/or a rule such as ``gsm8k``) and
the rollout engine on the TP actor (``--generation_engine``) — loads the GSM8K prompts and the optional
pretraining blocks, and hands them to the backend-neutral :func:`rlhf.ppo.session.assemble_session`.
Nothing here touches PEFT, Accelerate or Hugging Face ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf.data import load_dataset_dir
from rlhf.data.gsm8k import answers_match, extract_prediction
from rlhf.data.templates import encode_prompt_text
from rlhf.models.loading import load_tokenizer
from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import PPOArguments
from rlhf.ppo.data import PromptSet, cut_prompts, hold_out_prompts, load_pretrain
from rlhf.ppo.loop import PPOSession
from rlhf.ppo.rewards import AdapterScorer, RuleScorer, Scorer, SumScorer, load_reward_fn
from rlhf.ppo.session import (
    SessionParts,
    assemble_session,
    count_total_steps,
    rollout_generator,
    warn_beyond_context,
)
from rlhf.tp.backend import TPBackend
from rlhf.tp.distributed import device, init_model_parallel
from rlhf.tp.loading import check_checkpoint, generation_eos_ids, load_tp_model, resolve_tp_dtype
from rlhf.tp.lora import apply_lora
from rlhf.tp.ppo_models import TPPolicyModels
from rlhf.tp.prompt import gsm8k_prompt
from rlhf.tp.verifier import check_verifier_dir

if TYPE_CHECKING:
    from rlhf.tp.ppo_train import TPPPOArguments, TPPPOTrainingArguments


def gsm8k_reward(labels: dict[str, str]):
    """A rule reward: 1.0 when a response's final answer matches the label of its prompt, else 0.0."""

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(answers_match(extract_prediction(r), labels[p])) for p, r in zip(prompts, responses)]

    return reward


def gsm8k_prompts(train_file: str, tokenizer, max_prompt_length: int) -> tuple[PromptSet, dict[str, str]]:
    """The rollout prompts of ``--train_file`` (GSM8K rows), tokenized as ``solver_train`` and the verifier
    saw them (:func:`rlhf.data.templates.encode_prompt_text`: no EOS a tokenizer appends), cut to
    ``max_prompt_length``; and each prompt text's label."""
    rows = list(load_dataset_dir(train_file, "gsm8k"))
    texts = [gsm8k_prompt(r["question"]) for r in rows]
    ids = [encode_prompt_text(t, tokenizer) for t in texts]
    ids = cut_prompts(ids, max_prompt_length, tokenizer.bos_token_id, train_file)
    return PromptSet(ids, texts, f"--train_file {train_file}"), {t: r["label"] for t, r in zip(texts, rows)}


def load_models(
    tp: TPPPOArguments,
    lora: LoraSpec,
    rank: int,
    world_size: int,
    dev: torch.device,
    with_critic: bool = True,
) -> TPPolicyModels:
    """Actor (``--actor_ckpt_dir``), critic (``--critic_ckpt_dir``, scalar head) and reward on this rank.

    With LoRA (``lora.use_lora``) actor and critic get adapters (the critic's head trains too), the
    reference is the actor with adapters off, and a reward dir equal to the critic's is the critic with
    adapters off plus its initial head; full-parameter: a frozen reference copy and a separate reward model.
    ``with_critic=False`` (a critic-free ``--advantage_estimator``) loads no critic; the reward is then
    always its own frozen model.
    """
    dtype = resolve_tp_dtype(tp.dtype, dev, training=True)

    def load(path: str, scalar_head: bool, model_type: str | None = None):
        return load_tp_model(path, rank=rank, world_size=world_size, device=dev, dtype=dtype,
                             model_type=model_type, scalar_head=scalar_head)  # fmt: skip

    actor = load(tp.actor_ckpt_dir, False, tp.model_type)
    critic = load(tp.critic_ckpt_dir, True) if with_critic else None
    reference = None if lora.use_lora else load(tp.actor_ckpt_dir, False).requires_grad_(False).eval()
    share = with_critic and lora.use_lora and tp.reward_model_ckpt_dir is not None
    share = share and Path(tp.reward_model_ckpt_dir).resolve() == Path(tp.critic_ckpt_dir).resolve()
    reward = None
    if tp.reward_model_ckpt_dir and not share:
        reward = load(tp.reward_model_ckpt_dir, True).requires_grad_(False).eval()
    if lora.use_lora:
        for model in (actor, critic) if with_critic else (actor,):
            apply_lora(model, lora)
        if with_critic:
            critic.v_head.weight.requires_grad_(True)
    kwargs = dict(actor_source=tp.actor_ckpt_dir, critic_source=tp.critic_ckpt_dir, reference=reference)
    if share:
        return TPPolicyModels.sharing_critic_base(actor, critic, **kwargs)
    return TPPolicyModels(actor, critic, reward=reward, **kwargs)


def build_scorer(tp: TPPPOArguments, models: TPPolicyModels, labels: dict[str, str]) -> Scorer:
    """The verifier's score at the last token, a rule (``gsm8k`` or ``file.py:fn``), or their sum."""
    scorers: list[Scorer] = []
    if tp.reward_model_ckpt_dir:
        scorers.append(AdapterScorer(models))  # models.reward_scores: the verifier at the last token
    if tp.reward_fn:
        fn = gsm8k_reward(labels) if tp.reward_fn == "gsm8k" else load_reward_fn(tp.reward_fn)
        scorers.append(RuleScorer(fn, tp.reward_fn))
    return scorers[0] if len(scorers) == 1 else SumScorer(scorers)


def build_tp_session(tp: TPPPOArguments, ppo: PPOArguments, args: TPPPOTrainingArguments) -> PPOSession:
    """Flags (after :func:`rlhf.tp.ppo_train.apply_description_flags`) -> the session of ``ppo_train``."""
    rank, world_size = init_model_parallel()
    check_checkpoint(
        tp.actor_ckpt_dir, world_size, "--actor_ckpt_dir", tp.model_type
    )  # before any model loads
    if tp.critic_ckpt_dir and ppo.needs_critic:
        check_checkpoint(tp.critic_ckpt_dir, world_size, "--critic_ckpt_dir")
    if tp.reward_model_ckpt_dir:  # before any model loads: a non-verifier would score every rollout 0
        check_verifier_dir(tp.reward_model_ckpt_dir, world_size, "--reward_model_ckpt_dir")
    backend = TPBackend(rank, args.report_to_list, args.output_dir)
    torch.manual_seed(args.seed)  # the same on every rank: the ranks run one replica in lockstep
    tokenizer = load_tokenizer(tp.actor_ckpt_dir, trust_remote_code=tp.trust_remote_code, padding_side="left")
    prompts, labels = gsm8k_prompts(tp.train_file, tokenizer, ppo.max_prompt_length)
    eval_prompts = None
    if args.do_eval:  # the gsm8k rule's labels cover them too
        prompts, eval_prompts = hold_out_prompts(prompts, tp.split_ratio, args.seed)
    count_total_steps(
        len(prompts), ppo, args, 1, quiet=True
    )  # enough prompts for one rollout, before any model loads
    pretrain = None
    if tp.pretrain_dataset_dir:  # before the models too: an error in it comes before the loading
        pretrain = load_pretrain(tp.pretrain_dataset_dir, tokenizer, tp.block_size, None)
    models = load_models(tp, tp.lora_spec(), rank, world_size, device(), with_critic=ppo.needs_critic)
    for model in (models.actor, models.critic) if models.has_critic else (models.actor,):
        backend.prepare(model)  # records which parameters are split, for the gradient norm
    # max_seq_len: the checkpoint's max_position_embeddings
    warn_beyond_context(models.actor.args.max_seq_len, prompts, pretrain, ppo, "--max_gen_len")
    parts = SessionParts(
        backend=backend, models=models, scorer=build_scorer(tp, models, labels), tokenizer=tokenizer,
        prompts=prompts, pretrain=pretrain,
        generator=rollout_generator(
            ppo, args, models.generation_model, tokenizer, generation_eos_ids(tp.actor_ckpt_dir)
        ),
        inputs=tp.input_paths(), eval_prompts=eval_prompts,
    )  # fmt: skip
    return assemble_session(parts, ppo, args, {**vars(tp), **vars(ppo), **vars(args)})
