"""Flags of the PPO stage: models, algorithm, and the Trainer-style loop settings.

Defaults follow the step-3 reference command (``../shared/spec/peft-rlhf-readme.md``); flags that
recipes pass for the Hugging Face Trainer (``--do_train``, ``--dataloader_num_workers``,
``--overwrite_output_dir``, ...) are accepted so the command runs as written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.args import (
    DEFAULT_LORA_TARGET,
    DataArguments,
    check_output_dir,
    check_output_not_input,
    check_positive_flags,
    split_comma_list,
)
from rlhf.errors import ConfigError
from rlhf.ppo.estimators import ESTIMATORS, NEEDS_CRITIC, NEEDS_GROUPS, EstimatorSettings
from rlhf.ppo.kl import KL_ESTIMATORS, AdaptiveKLController
from rlhf.ppo.losses import LOSS_AGG_MODES
from rlhf.ppo.memory import forward_batch_size
from rlhf.ppo.profiling import check_profile_step

logger = logging.getLogger(__name__)


@dataclass
class PPODataArguments(DataArguments):
    """The shared data flags, as PPO reads them: prompts from ``--dataset_dir``, every one of them used."""

    dataset_dir: str = field(
        metadata={"help": "Prompts: folder (or file) of *.json / *.jsonl / *.jsonl.gz records (any SFT "
                  "record's prompt, or {\"prompt\"})."}
    )  # fmt: skip
    split_ratio: float = field(
        default=0.01,
        metadata={
            "help": "With --do_eval: the share of the distinct prompts held out for evaluation (never trained on); "
            "without it PPO trains on every prompt."
        },
    )
    block_size: int = field(
        default=512, metadata={"help": "Tokens per block of --pretrain_dataset_dir text."}
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Accepted for the shared scripts; prompts are tokenized in this process."},
    )


@dataclass
class PPOModelArguments:
    sft_model_path: str = field(metadata={"help": "SFT model dir, or an adapter dir (merged into its base)."})
    model_type: str | None = field(default=None, metadata={"help": "llama, mistral, qwen2, ... (checked)."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Base weights dtype; half precision falls back to float32 without a GPU.",
                  "choices": ["auto", "float32", "float16", "bfloat16"]},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own code."})
    reward_lora_path: str | None = field(
        default=None,
        metadata={"help": "Reward-model adapter dir from run_rm_with_peft.py (LoRA + score head)."},
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "A separate, frozen reward model: a full sequence-classification model dir "
                  "(num_labels=1), or a reward-model adapter dir from run_rm_with_peft.py, loaded onto its own "
                  "base and merged (--reward_lora_path shares the actor's base instead)."},
    )  # fmt: skip
    reward_fn: str | None = field(
        default=None,
        metadata={"help": "Rule reward 'path/to/file.py:fn' or 'module:fn', called as "
                  "fn(prompts: list[str], responses: list[str]) -> list[float]; summed with a model score."},
    )  # fmt: skip
    critic_init: str = field(
        default="reward",
        metadata={"help": "Start the critic from the reward model (adapter + score head) or the SFT model.",
                  "choices": ["reward", "sft"]},
    )  # fmt: skip
    actor_lora_rank: int = field(default=8, metadata={"help": "Actor LoRA rank; -1 or 0 = full-parameter."})
    actor_lora_alpha: float = field(default=32.0, metadata={"help": "Actor LoRA alpha."})
    actor_lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Actor LoRA dropout (off by default, as TRL's PPOTrainer and OpenRLHF: the update's "
                  "forward then computes the policy that sampled, and the first ratio is 1)."},
    )  # fmt: skip
    actor_lora_target: str = field(default=DEFAULT_LORA_TARGET, metadata={"help": "Actor LoRA modules."})
    critic_lora_rank: int = field(default=8, metadata={"help": "Critic LoRA rank; -1 or 0 = full-parameter."})
    critic_lora_alpha: float = field(default=32.0, metadata={"help": "Critic LoRA alpha."})
    critic_lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Critic LoRA dropout (off by default: dropout noise alone can push a value past "
                  "--value_clip, where it gets no gradient)."},
    )  # fmt: skip
    critic_lora_target: str = field(default=DEFAULT_LORA_TARGET, metadata={"help": "Critic LoRA modules."})
    critic_output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the critic goes (default: <output_dir>/critic); unused without a critic."},
    )
    pretrain_dataset_dir: str | None = field(
        default=None, metadata={"help": "*.txt pretraining text for the PPO-ptx loss (off when unset)."}
    )


@dataclass
class PPOArguments:
    max_prompt_length: int = field(
        default=256,
        metadata={"help": "Longer prompts keep their BOS and last tokens (N in all; counted in the log)."},
    )
    max_response_length: int = field(default=256, metadata={"help": "Most new tokens per response."})
    min_response_length: int = field(
        default=1,
        metadata={"help": "Fewest new tokens (EOS suppressed); equal to --max_response_length, every response "
                  "runs to that length without EOS (a warning says so; benchmarks use it)."},
    )  # fmt: skip
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1.0 = off."})
    generation_engine: str = field(
        default="auto",
        metadata={"help": "Rollout generator: static (our engine: static KV cache, CUDA graphs on GPU), hf "
                  "(Hugging Face generate), auto (static where it supports the model, else hf).",
                  "choices": ["auto", "hf", "static"]},
    )  # fmt: skip
    generation_lora: str = field(
        default="unmerged",
        metadata={"help": "How the static engine runs the actor's LoRA adapter: unmerged (the adapter layers, as "
                  "in training) or merged (a copy of the weights with the adapter folded in, refreshed before "
                  "each rollout: fewer kernels per decode step, one more copy of the adapted weights in memory; "
                  "Hugging Face dense models).", "choices": ["unmerged", "merged"]},
    )  # fmt: skip
    generation_compile: bool = field(
        default=False,
        metadata={"help": "Run the static engine's decode step through torch.compile (inductor) before its "
                  "CUDA graph is captured: fewer, fused kernels per step, a compile at the first rollout."},
    )  # fmt: skip
    old_logprobs: str = field(
        default="auto",
        metadata={"help": "Where the rollout's old log-probs (the PPO ratio's denominator, and the KL to the "
                  "reference) come from: generator (the sampled tokens' log-probs the generator returns, no extra "
                  "forward), forward (an eval-mode forward of the actor, the update's own numerics), update (the "
                  "update's own forward, detached: no extra forward; only when the update is on-policy, i.e. one "
                  "epoch, no optimizer step inside a rollout, and no KL in the reward: --use_kl_loss or "
                  "--kl_penalty_beta 0, without --target_kl), auto (update where it applies; else generator in "
                  "float32 and forward in bf16/fp16, where the generator's decode path rounds differently: the "
                  "first ratio would not be 1 and the KL at the start not 0).",
                  "choices": ["auto", "generator", "forward", "update"]},
    )  # fmt: skip
    advantage_estimator: str = field(
        default="gae",
        metadata={"help": "gae (PPO with a learned critic) or a critic-free estimator (no critic is built): "
                  "grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline.", "choices": list(ESTIMATORS)},
    )  # fmt: skip
    num_samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Responses sampled per prompt (a group, kept on one process); grpo, dr_grpo, rloo "
                  "and reinforce_pp_baseline need 2 or more."},
    )  # fmt: skip
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "How the policy loss averages its per-token terms: token-mean (all tokens alike), "
                  "seq-mean-token-mean (each response alike, the GRPO paper), seq-mean-token-sum-norm (token sums "
                  "over --max_response_length, Dr. GRPO).", "choices": list(LOSS_AGG_MODES)},
    )  # fmt: skip
    use_kl_loss: bool = field(
        default=False,
        metadata={"help": "Put the KL in the policy loss (β·k3 per token, the GRPO paper) instead of the reward."},
    )  # fmt: skip
    per_device_mini_train_batch_size: int = field(
        default=-1,
        metadata={"help": "Samples per PPO mini-batch (-1 = one generation batch: "
                  "--per_device_train_batch_size x --num_samples_per_prompt)."},
    )  # fmt: skip
    per_device_forward_batch_size: int = field(
        default=-1,
        metadata={"help": "Rows per forward of the rollout's reward, reference, old log-prob and value passes "
                  "(-1 = --per_device_mini_train_batch_size); bounds their memory whatever the generation batch."},
    )  # fmt: skip
    rollout_batches: int = field(default=1, metadata={"help": "Generation batches per rollout."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ (GAE and REINFORCE++)."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ."})
    kl_penalty_beta: float = field(
        default=0.02,
        metadata={"help": "β of the KL penalty (in the reward, or with --use_kl_loss in the loss)."},
    )
    kl_penalty: str = field(default="k1", metadata={"help": "KL estimator.", "choices": list(KL_ESTIMATORS)})
    target_kl: float | None = field(
        default=None, metadata={"help": "Adaptive β (Ziegler et al. 2019) towards this KL per sequence."}
    )
    kl_horizon: float = field(default=10000.0, metadata={"help": "Horizon of the adaptive KL controller."})
    reward_score_clip: float = field(default=10.0, metadata={"help": "Scores are clipped to ±this."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses that end without EOS."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten token rewards before GAE (--advantage_estimator gae only)."}
    )
    ratio_clip: float = field(default=0.2, metadata={"help": "PPO ratio clip ε."})
    value_clip: float = field(default=0.2, metadata={"help": "Value clip around the rollout values."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    actor_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the policy loss."})
    critic_loss_weight: float = field(default=2.0, metadata={"help": "Weight of the value loss."})
    pretrain_loss_weight: float = field(default=0.1, metadata={"help": "Weight of the pretraining loss."})
    pretrain_warmup_steps: int = field(
        default=500, metadata={"help": "Optimizer steps over which the pretraining weight rises from 0."}
    )
    pretrain_batch_size: int = field(
        default=0, metadata={"help": "Pretraining blocks per mini-batch (0 = the mini-batch size)."}
    )
    actor_lr: float = field(default=1e-4, metadata={"help": "Actor learning rate."})
    critic_lr: float = field(default=1e-4, metadata={"help": "Critic learning rate."})

    @property
    def needs_critic(self) -> bool:
        """Whether ``--advantage_estimator`` trains a critic (only ``gae`` does)."""
        return self.advantage_estimator in NEEDS_CRITIC

    def estimator_settings(self) -> EstimatorSettings:
        """The flags steps 4–5 read (:func:`rlhf.ppo.estimators.estimate_advantages`)."""
        return EstimatorSettings(
            self.advantage_estimator, self.gamma, self.lam, self.whiten_rewards, not self.use_kl_loss
        )


@dataclass
class PPOTrainingArguments:
    output_dir: str = field(metadata={"help": "Actor adapter, tokenizer, checkpoints and metrics.jsonl."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an --output_dir that holds checkpoints (they, metrics.jsonl and "
                  "eval_samples.jsonl are removed) instead of resuming from the newest one."},
    )  # fmt: skip
    do_train: bool = field(default=True, metadata={"help": "Accepted for Trainer compatibility."})
    seed: int = field(default=42, metadata={"help": "Seed for models, data order and sampling."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Prompts per generation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Mini-batches per optimizer step."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num_train_epochs."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_steps: float = field(default=0.0, metadata={"help": "Warm-up steps (a value < 1 is a ratio)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping per model; 0 = off."})
    logging_steps: int = field(default=10, metadata={"help": "Write metrics every N optimizer steps."})
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step."})
    do_eval: bool = field(
        default=False,
        metadata={"help": "Evaluate the policy on the --split_ratio share of the distinct prompts, held out from training: "
                  "greedy responses scored by the reward, before the first step, every --eval_steps steps and at "
                  "the end (eval/* rows in metrics.jsonl, the responses in eval_samples.jsonl)."},
    )  # fmt: skip
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "With --do_eval: evaluate every N optimizer steps (default: --logging_steps)."},
    )
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the last N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "checkpoint-N dir to resume (default: the newest one in --output_dir, if any)."},
    )
    report_to: str = field(default="none", metadata={"help": "wandb, tensorboard, all or none (comma list)."})
    run_name: str | None = field(default=None, metadata={"help": "Tracker run name."})
    fp16: bool = field(default=False, metadata={"help": "float16 autocast (GPU only; dropped on CPU)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (GPU only; dropped on CPU)."})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Accepted; prompts are tokenized once and held in memory."}
    )
    ddp_timeout: int = field(default=1800, metadata={"help": "Process-group timeout in seconds."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    profile_step: int = field(
        default=0,
        metadata={"help": "Profile optimizer step N with torch.profiler (0: none): a Chrome trace and a summary of "
                  "device time by kind of kernel under --output_dir/profile/ (rlhf/ppo/profiling.py)."},
    )  # fmt: skip
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each decoder layer in the actor and critic updates' backward (non-reentrant; "
                  "LoRA or full): activations of one layer instead of all, for about a third more update time."},
    )  # fmt: skip
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Run each decoder layer's forward through torch.compile, one compiled function for all "
                  "layers (rlhf/models/regional_compile.py): fused kernels in the rollout's forwards and the "
                  "updates, for a compile of a few graphs at the first step. Not on the tensor-parallel backend."},
    )  # fmt: skip
    torch_compile_backend: str | None = field(
        default=None,
        metadata={"help": "torch.compile backend of --torch_compile (default inductor; aot_eager, ...); giving one "
                  "turns --torch_compile on, as for Trainer."},
    )  # fmt: skip

    @property
    def report_to_list(self) -> list[str]:
        return split_comma_list(self.report_to)

    @property
    def eval_every(self) -> int:
        """``--eval_steps``, by default ``--logging_steps``."""
        return self.eval_steps if self.eval_steps is not None else self.logging_steps


def critic_output_dir(models: PPOModelArguments, train: PPOTrainingArguments) -> Path:
    """``--critic_output_dir``, by default ``<output_dir>/critic``."""
    return Path(models.critic_output_dir or Path(train.output_dir) / "critic")


def rollout_size(ppo: PPOArguments, train: PPOTrainingArguments) -> int:
    """Samples per process in one rollout: ``--rollout_batches`` x ``--per_device_train_batch_size`` prompts
    x ``--num_samples_per_prompt``."""
    return ppo.rollout_batches * train.per_device_train_batch_size * ppo.num_samples_per_prompt


def off_policy_reason(ppo: PPOArguments, train: PPOTrainingArguments) -> str | None:
    """Why the update is not on-policy, or ``None`` when it is: one epoch over the rollout and no optimizer
    step inside a rollout (its mini-batches are one step, or whole rollouts accumulate into one: each
    mini-batch then runs on the weights that sampled it), with no KL in the reward (the reward needs the
    policy's log-probs before the update). Then ``--old_logprobs update``
    may take the update's own forward, detached, as the old log-probs (the ratio is 1 at every token)."""
    mini_batches = rollout_size(ppo, train) // ppo.per_device_mini_train_batch_size
    if ppo.ppo_epochs != 1:
        return f"--ppo_epochs {ppo.ppo_epochs} (the epochs after the first train on updated weights)"
    if train.gradient_accumulation_steps % mini_batches:
        return (
            f"{mini_batches} mini-batches per rollout, --gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps}: an optimizer step inside a rollout"
        )
    if ppo.target_kl is not None:
        return "--target_kl (the controller reads the rollout's KL before the update)"
    if not ppo.use_kl_loss and ppo.kl_penalty_beta != 0:
        return "the KL is in the reward (--use_kl_loss or --kl_penalty_beta 0 takes it out)"
    return None


def check_old_logprobs(ppo: PPOArguments, train: PPOTrainingArguments) -> None:
    """``--old_logprobs update`` only where the update is on-policy (:func:`off_policy_reason`)."""
    if ppo.old_logprobs == "update" and (reason := off_policy_reason(ppo, train)):
        raise ConfigError(f"--old_logprobs update needs an on-policy update, but: {reason}")


def validate_estimator(ppo: PPOArguments) -> None:
    """The estimator flags (both backends): groups for the group estimators, GAE-only flags."""
    name, k = ppo.advantage_estimator, ppo.num_samples_per_prompt
    if name not in ESTIMATORS:
        raise ConfigError(f"--advantage_estimator {name}: expected one of {', '.join(ESTIMATORS)}")
    check_positive_flags({"--num_samples_per_prompt": k})
    if name in NEEDS_GROUPS and k < 2:
        raise ConfigError(
            f"--advantage_estimator {name} compares the responses to one prompt: "
            f"pass --num_samples_per_prompt 2 or more (got {k})"
        )
    if ppo.loss_agg_mode not in LOSS_AGG_MODES:
        raise ConfigError(f"--loss_agg_mode {ppo.loss_agg_mode}: expected one of {', '.join(LOSS_AGG_MODES)}")
    if ppo.whiten_rewards and name != "gae":
        raise ConfigError(f"--whiten_rewards applies to --advantage_estimator gae only (got {name})")


def check_compile_backend(name: str) -> None:
    """--torch_compile_backend names a registered torch.compile backend (checked before any model loads)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ConfigError(f"--torch_compile_backend {name}: expected one of {', '.join(known)}")


def check_sampling_flags(ppo: PPOArguments, response_flag: str = "--max_response_length") -> None:
    """The sampling and KL flags both PPO entry points take (``response_flag``: the stage's name for the
    response budget)."""
    if ppo.min_response_length > ppo.max_response_length:
        raise ConfigError(f"--min_response_length must be <= {response_flag}")
    if ppo.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    if ppo.target_kl is not None and ppo.target_kl <= 0:
        raise ConfigError("--target_kl must be > 0")
    check_ranges(ppo)
    if ppo.target_kl is not None and ppo.kl_penalty_beta == 0:
        raise ConfigError(
            "--target_kl adapts --kl_penalty_beta by multiplying it after each rollout, so from "
            "--kl_penalty_beta 0 it never moves: give a starting --kl_penalty_beta > 0 (e.g. 0.02), or no --target_kl"
        )
    if ppo.min_response_length >= ppo.max_response_length:
        logger.warning(
            "--min_response_length %d >= %s %d: EOS is suppressed at every step, so every response is %d tokens "
            "and none ends with EOS%s",
            ppo.min_response_length, response_flag, ppo.max_response_length, ppo.max_response_length,
            " (each gets --missing_eos_penalty)" if ppo.missing_eos_penalty is not None else "",
        )  # fmt: skip
    truncating = [f for f, on in (("--top_k", ppo.top_k > 0), ("--top_p", ppo.top_p < 1.0)) if on]
    if truncating:
        logger.warning(
            "%s: responses are sampled from a truncated distribution, while the PPO ratio and the KL read the "
            "full one's log-probs, so the update is slightly off-policy (TRL's PPOTrainer samples with "
            "neither); REINFORCE-style estimators are the most sensitive to it",
            " and ".join(truncating),
        )


# (flag, low, high, whether the low end is allowed): the PPO flags whose value outside a range would run
# without complaint and silently mean something else (a clip of 0 zeroes every score, top-p 0 is greedy,
# 1.5 turns it off; a γ or λ above 1 grows the returns with the distance to the end; a negative loss weight
# or entropy coefficient ascends the loss; a negative --missing_eos_penalty rewards running out of tokens)
RANGES = (
    ("top_p", 0.0, 1.0, False),
    ("top_k", 0, None, True),
    ("min_response_length", 0, None, True),
    ("reward_score_clip", 0.0, None, False),
    ("ratio_clip", 0.0, None, False),
    ("value_clip", 0.0, None, False),
    ("gamma", 0.0, 1.0, True),
    ("lam", 0.0, 1.0, True),
    ("kl_penalty_beta", 0.0, None, True),
    ("kl_horizon", 0.0, None, False),
    ("pretrain_loss_weight", 0.0, None, True),
    ("actor_loss_weight", 0.0, None, True),
    ("critic_loss_weight", 0.0, None, True),
    ("entropy_coef", 0.0, None, True),
    ("missing_eos_penalty", 0.0, None, True),
    ("pretrain_warmup_steps", 0, None, True),
    ("actor_lr", 0.0, None, True),
    ("critic_lr", 0.0, None, True),
)


def check_kl_horizon(ppo: PPOArguments, samples_per_rollout: int) -> None:
    """With ``--target_kl``, β is multiplied by 1 + e·n/horizon after each rollout (e within
    ±:data:`~rlhf.ppo.kl.AdaptiveKLController.MAX_ERROR`, n = ``samples_per_rollout`` over all processes): a
    one-line error when a KL below the target would make that factor zero or negative (a KL bonus). Up front
    with one process's samples (a lower bound of n), and again once the processes are known."""
    if ppo.target_kl is None:
        return
    bound = AdaptiveKLController.MAX_ERROR * samples_per_rollout
    if bound >= ppo.kl_horizon:
        raise ConfigError(
            f"--kl_horizon {ppo.kl_horizon:g}: the adaptive KL controller multiplies β by 1 + e·n/horizon after "
            f"each rollout (e within ±{AdaptiveKLController.MAX_ERROR}, n = {samples_per_rollout} samples), so "
            f"a KL below --target_kl would turn β into {1 - bound / ppo.kl_horizon:.3g}·β: zero or negative, a "
            f"KL bonus. Give --kl_horizon > {bound:g} (default 10000)"
        )


def check_training_ranges(train: PPOTrainingArguments) -> None:
    """The loop's schedule flags: a run must have steps to train, and warm-up, weight decay and gradient
    clipping take no negative values."""
    if train.max_steps <= 0 and train.num_train_epochs <= 0:  # --max_steps <= 0: by epochs (as Trainer)
        raise ConfigError(
            f"nothing to train: --max_steps {train.max_steps}, --num_train_epochs {train.num_train_epochs:g} "
            "(give --max_steps > 0, or --num_train_epochs > 0)"
        )
    for flag in ("warmup_steps", "weight_decay", "max_grad_norm"):
        if getattr(train, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {getattr(train, flag)}")
    if train.eval_steps is not None and train.eval_steps <= 0:
        raise ConfigError(f"--eval_steps must be > 0, got {train.eval_steps}")


def check_eval_split(split_ratio: float) -> None:
    """``--do_eval`` holds out ``--split_ratio`` of the prompts: a share in (0, 1)."""
    if not 0 < split_ratio < 1:
        raise ConfigError(
            f"--do_eval holds out --split_ratio of the prompts: it must be in (0, 1), got {split_ratio:g}"
        )


def check_ranges(ppo: PPOArguments) -> None:
    """One-line errors for the flags of :data:`RANGES` outside their range."""
    for name, low, high, low_ok in RANGES:
        value = getattr(ppo, name)
        if value is None:  # an optional flag not given
            continue
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            if high is None:
                expected = f"{'>=' if low_ok else '>'} {low}"
            else:
                expected = f"in {'[' if low_ok else '('}{low}, {high}]"
            raise ConfigError(f"--{name} must be {expected}, got {value}")


def check_reward_adapter_dir(path: str) -> None:
    """``--reward_lora_path`` must be a PEFT adapter dir; a full model dir goes to ``--reward_model_path``."""
    where = Path(path)
    if not where.is_dir():
        raise ConfigError(f"--reward_lora_path {path}: no such directory")
    if (where / "adapter_config.json").is_file():
        return
    if (where / "config.json").is_file():
        raise ConfigError(
            f"--reward_lora_path {path} is a full model dir, not a LoRA adapter: pass it as --reward_model_path"
        )
    raise ConfigError(f"--reward_lora_path {path} is not a LoRA adapter dir (no adapter_config.json)")


def input_paths(models: PPOModelArguments, dataset_dir: str | None) -> dict[str, str | None]:
    """Flag -> the path the run reads (no output dir may be one; a resume needs their files unchanged)."""
    return {"--sft_model_path": models.sft_model_path, "--reward_lora_path": models.reward_lora_path,
            "--reward_model_path": models.reward_model_path, "--dataset_dir": dataset_dir,
            "--pretrain_dataset_dir": models.pretrain_dataset_dir}  # fmt: skip


def validate(
    models: PPOModelArguments, ppo: PPOArguments, train: PPOTrainingArguments, dataset_dir: str | None = None
) -> None:
    """Check flag combinations once, up front (before any model loads); messages name the flags.
    ``dataset_dir``: the prompts' ``--dataset_dir``, which no output dir may be."""
    if not (models.reward_lora_path or models.reward_model_path or models.reward_fn):
        raise ConfigError("give a reward: --reward_lora_path, --reward_model_path or --reward_fn")
    if models.reward_lora_path and models.reward_model_path:
        raise ConfigError("--reward_lora_path and --reward_model_path are exclusive")
    if models.reward_lora_path:
        check_reward_adapter_dir(models.reward_lora_path)
    validate_estimator(ppo)
    check_profile_step(train.profile_step)
    if train.torch_compile or train.torch_compile_backend is not None:  # as Trainer: a backend asks for it
        train.torch_compile, train.torch_compile_backend = True, train.torch_compile_backend or "inductor"
        check_compile_backend(train.torch_compile_backend)
    check_output_dir(train.output_dir, "--output_dir")
    inputs = input_paths(models, dataset_dir)
    check_output_not_input(train.output_dir, inputs)
    if ppo.needs_critic:
        critic_dir = critic_output_dir(models, train)
        check_output_dir(critic_dir, "--critic_output_dir")
        check_output_not_input(critic_dir, inputs, "--critic_output_dir")
        if critic_dir.resolve() == Path(train.output_dir).resolve():
            raise ConfigError(
                f"--critic_output_dir {models.critic_output_dir} is --output_dir: the critic's adapter would "
                "overwrite the actor's there; give the critic a directory of its own (default <output_dir>/critic)"
            )
    elif models.critic_output_dir:
        logger.warning(
            "--advantage_estimator %s trains no critic: nothing is written to --critic_output_dir",
            ppo.advantage_estimator,
        )
    if ppo.per_device_mini_train_batch_size == -1:
        ppo.per_device_mini_train_batch_size = train.per_device_train_batch_size * ppo.num_samples_per_prompt
    loop_flags = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
    ppo_flags = ("per_device_mini_train_batch_size", "rollout_batches", "ppo_epochs", "max_response_length",
                 "max_prompt_length")  # fmt: skip
    positive = {f"--{name}": getattr(train, name) for name in loop_flags}
    check_positive_flags(positive | {f"--{name}": getattr(ppo, name) for name in ppo_flags})
    rollout = rollout_size(ppo, train)
    if rollout % ppo.per_device_mini_train_batch_size:
        raise ConfigError(
            f"--per_device_mini_train_batch_size {ppo.per_device_mini_train_batch_size} must divide the "
            f"rollout size --per_device_train_batch_size x --rollout_batches x --num_samples_per_prompt = "
            f"{rollout}"
        )
    check_sampling_flags(ppo)
    check_kl_horizon(ppo, rollout)
    if ppo.pretrain_batch_size <= 0:
        ppo.pretrain_batch_size = ppo.per_device_mini_train_batch_size
    forward_batch_size(ppo.per_device_forward_batch_size, ppo.per_device_mini_train_batch_size)  # checks it
    check_old_logprobs(ppo, train)
    check_training_ranges(train)
