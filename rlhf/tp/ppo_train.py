"""PPO on the tensor-parallel model with a verifier reward (the Llama-RLHF description's PPO command).

::

    torchrun --nproc_per_node 8 -m rlhf.tp.ppo_train --actor_ckpt_dir /path/to/your/policy/model/ \\
        --actor_save_dir /path/to/save/actor/ --critic_ckpt_dir /path/to/your/reward/model/ \\
        --critic_save_dir /path/to/save/critic/ --reward_model_ckpt_dir /path/to/your/reward/model/ \\
        --max_batch_size 6 --max_buffer_size 96 --train_file dataset/GSM8K/train.json
    python -m rlhf.tp.ppo_train ...           # one process (TP=1)

The same loop and math as ``run_ppo_with_peft.py`` (:func:`rlhf.ppo.loop.train`), behind the seams:
:class:`rlhf.tp.backend.TPBackend`, :class:`rlhf.tp.ppo_backend.TPGenerator` and
:class:`rlhf.tp.ppo_models.TPPolicyModels`. Prompts are ``gsm8k_prompt(question)`` of the ``--train_file``
rows. Reward: the verifier's score (``--reward_model_ckpt_dir``), ``--reward_fn gsm8k`` (1 when the final
answer matches the label, else 0; or any ``file.py:fn`` / ``module:fn`` rule), or both summed. The critic
starts from ``--critic_ckpt_dir`` (the verifier: its scalar head included). The PPO flags of
``run_ppo_with_peft.py`` apply (``--kl_penalty_beta``, ``--ppo_epochs``, ...); ``--max_batch_size`` sets the
generation and mini-batch size, ``--max_buffer_size`` the rollout size, ``--max_gen_len`` the response
length. Outputs: the actor and critic shard dirs (+ ``training/metrics.jsonl`` in the actor's) and
``--output_dir`` (default ``<actor_save_dir>_run``) with ``metrics.jsonl`` and ``checkpoint-N/``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.args import parse_args, split_comma_list
from rlhf.data import load_dataset_dir
from rlhf.data.gsm8k import answers_match, extract_prediction
from rlhf.errors import ConfigError, exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.models.loading import load_tokenizer
from rlhf.ppo.build import build_kl_controller, build_optimizers, count_total_steps, sampling_config
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
from rlhf.ppo.data import EpochSampler, PromptSet
from rlhf.ppo.loop import PPOSession, train
from rlhf.ppo.rewards import AdapterScorer, RuleScorer, Scorer, SumScorer, load_reward_fn
from rlhf.tp.backend import TPBackend
from rlhf.tp.distributed import barrier, device, init_model_parallel
from rlhf.tp.loading import load_tp_model, resolve_tp_dtype
from rlhf.tp.lora import apply_lora
from rlhf.tp.ppo_backend import TPGenerator
from rlhf.tp.ppo_models import TPPolicyModels
from rlhf.tp.prompt import gsm8k_prompt

logger = logging.getLogger(__name__)


@dataclass
class TPPPOArguments:
    actor_ckpt_dir: str = field(metadata={"help": "the policy to train (solver_train's --save_dir)"})
    actor_save_dir: str = field(metadata={"help": "where the trained actor's shards go"})
    critic_ckpt_dir: str = field(metadata={"help": "the critic's start: the verifier (its scalar head too)"})
    critic_save_dir: str = field(metadata={"help": "where the trained critic's shards go"})
    train_file: str = field(metadata={"help": "GSM8K rows whose questions are the prompts"})
    reward_model_ckpt_dir: str | None = field(
        default=None, metadata={"help": "the verifier scoring rollouts"}
    )
    reward_fn: str | None = field(
        default=None, metadata={"help": "gsm8k (final answer = label: 1, else 0) or file.py:fn / module:fn"}
    )
    model_type: str | None = field(default=None, metadata={"help": "family or preset of the actor; checked"})
    max_batch_size: int | None = field(
        default=None, metadata={"help": "prompts per generation batch and samples per PPO mini-batch"}
    )
    max_buffer_size: int | None = field(
        default=None, metadata={"help": "samples per rollout (a multiple of --max_batch_size)"}
    )
    max_gen_len: int | None = field(
        default=None, metadata={"help": "new tokens per response (sets --max_response_length)"}
    )
    lora_rank: int = field(
        default=-1, metadata={"help": "-1 (or 0) = full-parameter actor and critic; r > 0 = LoRA"}
    )
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target: str = field(default="all", metadata={"help": "wq,wk,wv,wo,w1,w2,w3 (or q_proj,...), or all"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own code (Qwen)"})


@dataclass
class TPPPOTrainingArguments(PPOTrainingArguments):
    output_dir: str | None = field(
        default=None, metadata={"help": "metrics.jsonl and checkpoint-N/ (default: <actor_save_dir>_run)"}
    )


def apply_description_flags(tp: TPPPOArguments, ppo: PPOArguments, args: TPPPOTrainingArguments) -> None:
    """Map the description's flags onto the PPO stage's; check what the TP engine cannot do."""
    if not tp.reward_model_ckpt_dir and not tp.reward_fn:
        raise ConfigError("pass --reward_model_ckpt_dir (a verifier), --reward_fn gsm8k, or both")
    if tp.max_batch_size is not None:
        args.per_device_train_batch_size = ppo.per_device_mini_train_batch_size = tp.max_batch_size
    if ppo.per_device_mini_train_batch_size <= 0:
        ppo.per_device_mini_train_batch_size = args.per_device_train_batch_size
    if tp.max_buffer_size is not None:
        if tp.max_buffer_size % args.per_device_train_batch_size:
            raise ConfigError(
                f"--max_buffer_size {tp.max_buffer_size} must be a multiple of --max_batch_size "
                f"{args.per_device_train_batch_size}"
            )
        ppo.rollout_batches = tp.max_buffer_size // args.per_device_train_batch_size
    if tp.max_gen_len is not None:
        ppo.max_response_length = tp.max_gen_len
    args.output_dir = args.output_dir or str(
        Path(tp.actor_save_dir).with_name(Path(tp.actor_save_dir).name + "_run")
    )


def gsm8k_reward(labels: dict[str, str]):
    """A rule reward: 1.0 when a response's final answer matches the label of its prompt, else 0.0."""

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(answers_match(extract_prediction(r), labels[p])) for p, r in zip(prompts, responses)]

    return reward


def load_models(tp: TPPPOArguments, rank: int, world_size: int, dev: torch.device) -> TPPolicyModels:
    dtype = resolve_tp_dtype(tp.dtype, dev)

    def load(path: str, scalar_head: bool, model_type: str | None = None):
        return load_tp_model(path, rank=rank, world_size=world_size, device=dev, dtype=dtype,
                             model_type=model_type, scalar_head=scalar_head)  # fmt: skip

    use_lora = tp.lora_rank > 0
    actor, critic = load(tp.actor_ckpt_dir, False, tp.model_type), load(tp.critic_ckpt_dir, True)
    reference = None if use_lora else load(tp.actor_ckpt_dir, False).requires_grad_(False).eval()
    share = use_lora and tp.reward_model_ckpt_dir is not None
    share = share and Path(tp.reward_model_ckpt_dir).resolve() == Path(tp.critic_ckpt_dir).resolve()
    reward = None
    if tp.reward_model_ckpt_dir and not share:
        reward = load(tp.reward_model_ckpt_dir, True).requires_grad_(False).eval()
    if use_lora:
        for model in (actor, critic):
            apply_lora(model, r=tp.lora_rank, alpha=tp.lora_alpha, dropout=tp.lora_dropout,
                       targets=split_comma_list(tp.lora_target))  # fmt: skip
        critic.v_head.weight.requires_grad_(True)
    kwargs = dict(actor_source=tp.actor_ckpt_dir, critic_source=tp.critic_ckpt_dir, reference=reference)
    if share:
        return TPPolicyModels.sharing_critic_base(actor, critic, **kwargs)
    return TPPolicyModels(actor, critic, reward=reward, **kwargs)


def build_scorer(tp: TPPPOArguments, models: TPPolicyModels, labels: dict[str, str]) -> Scorer:
    scorers: list[Scorer] = []
    if tp.reward_model_ckpt_dir:
        scorers.append(AdapterScorer(models))  # models.reward_scores: the verifier at the last token
    if tp.reward_fn:
        fn = gsm8k_reward(labels) if tp.reward_fn == "gsm8k" else load_reward_fn(tp.reward_fn)
        scorers.append(RuleScorer(fn, tp.reward_fn))
    return scorers[0] if len(scorers) == 1 else SumScorer(scorers)


def build_tp_session(tp: TPPPOArguments, ppo: PPOArguments, args: TPPPOTrainingArguments) -> PPOSession:
    apply_description_flags(tp, ppo, args)
    rank, world_size = init_model_parallel()
    dev = device()
    torch.manual_seed(args.seed)  # the same on every rank: the ranks run one replica in lockstep
    tokenizer = load_tokenizer(tp.actor_ckpt_dir, trust_remote_code=tp.trust_remote_code, padding_side="left")
    rows = list(load_dataset_dir(tp.train_file, "gsm8k"))
    texts = [gsm8k_prompt(r["question"]) for r in rows]
    prompts = PromptSet([tokenizer(t)["input_ids"][-ppo.max_prompt_length :] for t in texts], texts)
    labels = {t: r["label"] for t, r in zip(texts, rows)}
    models = load_models(tp, rank, world_size, dev)
    backend = TPBackend(rank)
    for model in (models.actor, models.critic):
        backend.prepare(model)
    total_steps = count_total_steps(len(prompts), ppo, args, 1)
    optimizers, schedulers = build_optimizers(models, ppo, args, total_steps)
    sampler = EpochSampler(len(prompts), args.per_device_train_batch_size, 1, 0, args.seed)
    return PPOSession(
        models=models, generator=TPGenerator(models.generation_model, sampling_config(ppo, tokenizer)),
        scorer=build_scorer(tp, models, labels), backend=backend, decode=tokenizer.batch_decode,
        prompts=prompts, prompt_sampler=sampler, pretrain=None, pretrain_sampler=None,
        optimizers=optimizers, schedulers=schedulers, kl_controller=build_kl_controller(ppo), ppo=ppo,
        args=args, total_steps=total_steps, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def run(tp: TPPPOArguments, ppo: PPOArguments, args: TPPPOTrainingArguments) -> PPOSession:
    session = build_tp_session(tp, ppo, args)
    train(session, resume_from=args.resume_from_checkpoint)
    session.models.save_actor(Path(tp.actor_save_dir))  # collective: every rank writes its shard
    session.models.save_critic(Path(tp.critic_save_dir))
    metrics = Path(args.output_dir) / "metrics.jsonl"
    if session.backend.is_main and metrics.is_file():
        (Path(tp.actor_save_dir) / "training").mkdir(exist_ok=True)
        shutil.copy2(metrics, Path(tp.actor_save_dir) / "training" / "metrics.jsonl")
        logger.info("actor saved to %s, critic to %s", tp.actor_save_dir, tp.critic_save_dir)
    barrier()
    return session


@exit_on_user_error
def main(argv: list[str] | None = None) -> PPOSession:
    setup_logging()
    tp, ppo, args = parse_args((TPPPOArguments, PPOArguments, TPPPOTrainingArguments), argv)
    return run(tp, ppo, args)


if __name__ == "__main__":
    main()
