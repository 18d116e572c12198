"""PPO on the tensor-parallel model with a verifier reward (the Llama-RLHF description's PPO command).

::

    torchrun --nproc_per_node 8 -m rlhf.tp.ppo_train --actor_ckpt_dir /path/to/your/policy/model/ \\
        --actor_save_dir /path/to/save/actor/ --critic_ckpt_dir /path/to/your/reward/model/ \\
        --critic_save_dir /path/to/save/critic/ --reward_model_ckpt_dir /path/to/your/reward/model/ \\
        --max_batch_size 6 --max_buffer_size 96 --train_file dataset/GSM8K/train.json
    python -m rlhf.tp.ppo_train ...           # one process (TP=1)

The same loop and math as ``run_ppo_with_peft.py`` (:func:`rlhf.ppo.loop.train`) and the same session
assembly (:func:`rlhf.ppo.session.assemble_session`); :func:`rlhf.tp.ppo_factory.build_tp_session` builds
the TP parts: :class:`rlhf.tp.backend.TPBackend`, the rollout engine on the TP actor
(:mod:`rlhf.generation`, ``--generation_engine auto|static``) and
:class:`rlhf.tp.ppo_models.TPPolicyModels`. Prompts are ``gsm8k_prompt(question)`` of the ``--train_file``
rows. Reward: the verifier's score (``--reward_model_ckpt_dir``), ``--reward_fn gsm8k`` (1 when the final
answer matches the label, else 0; or any ``file.py:fn`` / ``module:fn`` rule), or both summed. The critic
starts from ``--critic_ckpt_dir`` (the verifier: its scalar head included); a critic-free
``--advantage_estimator`` (``grpo``, ``rloo``, ...) loads and saves no critic and needs neither critic flag.
Re-running a command resumes from the newest ``checkpoint-N`` of ``--output_dir`` (``--overwrite_output_dir``
starts afresh), as ``run_ppo_with_peft.py`` does. The PPO flags of
``run_ppo_with_peft.py`` apply (``--kl_penalty_beta``, ``--ppo_epochs``, ``--top_k``, ``--report_to``, the
pretraining mix ``--pretrain_dataset_dir``/``--pretrain_loss_weight``/``--pretrain_warmup_steps``, ...);
``--max_batch_size`` sets the generation and mini-batch size, ``--max_buffer_size`` the rollout size,
``--max_gen_len`` the response length: the settings of ``run_ppo_with_peft.py``'s
``--per_device_train_batch_size`` / ``--per_device_mini_train_batch_size``, ``--rollout_batches`` and
``--max_response_length``, which work too (either name of a pair; both with values that disagree are
refused, one line naming both). Outputs: the actor and critic shard dirs (+ ``training/metrics.jsonl`` in the actor's) and
``--output_dir`` (default ``<actor_save_dir>_run``) with ``metrics.jsonl`` and ``checkpoint-N/``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path

from rlhf.args import CONFIG_SUFFIXES, check_positive_flags, config_file_argv, parse_args, split_comma_list
from rlhf.checkpoint_dirs import named_checkpoint
from rlhf.errors import ConfigError, exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import (
    PPOArguments,
    PPOTrainingArguments,
    check_eval_split,
    check_kl_horizon,
    check_old_logprobs,
    check_sampling_flags,
    check_training_ranges,
    rollout_size,
    validate_estimator,
)
from rlhf.ppo.loop import PPOSession, train
from rlhf.ppo.profiling import check_profile_step
from rlhf.ppo.resume import (
    check_settings_before_loading,
    flag_settings,
    resume_checkpoint,
    start_afresh,
)
from rlhf.publish import write_text_atomic
from rlhf.tp.distributed import process_group_scope
from rlhf.tp.ppo_factory import build_tp_session
from rlhf.tp.ppo_models import TORCH_COMPILE_REFUSED
from rlhf.tp.shard_dir import check_save_dir

logger = logging.getLogger(__name__)


DEFAULT_TRAIN_FILE = "dataset/GSM8K/train.json"  # where the description's other commands read GSM8K


@dataclass
class TPPPOArguments:
    actor_ckpt_dir: str = field(metadata={"help": "the policy to train (solver_train's --save_dir)"})
    actor_save_dir: str = field(metadata={"help": "where the trained actor's shards go"})
    train_file: str = field(
        default=DEFAULT_TRAIN_FILE,
        metadata={"help": "GSM8K rows whose questions are the prompts (default: the description's "
                  f"{DEFAULT_TRAIN_FILE}, relative to the working directory)"},
    )  # fmt: skip
    critic_ckpt_dir: str | None = field(
        default=None,
        metadata={"help": "the critic's start: the verifier (its scalar head too); needed by gae only"},
    )
    critic_save_dir: str | None = field(
        default=None, metadata={"help": "where the trained critic's shards go; needed by gae only"}
    )
    reward_model_ckpt_dir: str | None = field(
        default=None,
        metadata={"help": "the verifier scoring rollouts (verifier_train's --save_dir or its merged HF dir)"},
    )
    reward_fn: str | None = field(
        default=None, metadata={"help": "gsm8k (final answer = label: 1, else 0) or file.py:fn / module:fn"}
    )
    model_type: str | None = field(default=None, metadata={"help": "family or preset of the actor; checked"})
    max_batch_size: int | None = field(
        default=None, metadata={"help": "prompts per generation batch and samples per PPO mini-batch"}
    )
    max_buffer_size: int | None = field(
        default=None,
        metadata={"help": "samples per rollout (a multiple of --max_batch_size x --num_samples_per_prompt)"},
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
    pretrain_dataset_dir: str | None = field(
        default=None, metadata={"help": "*.txt pretraining text for the PPO-ptx loss (off when unset)"}
    )
    block_size: int = field(default=512, metadata={"help": "tokens per pretraining block"})
    split_ratio: float = field(
        default=0.01,
        metadata={"help": "with --do_eval: the share of --train_file's questions held out for evaluation (never "
                  "trained on), as run_ppo_with_peft.py's"},
    )  # fmt: skip
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own code (Qwen)"})

    def lora_spec(self) -> LoraSpec:
        """The actor's and the critic's adapter (``--lora_rank`` <= 0: full-parameter, see ``use_lora``)."""
        return LoraSpec(
            self.lora_rank, self.lora_alpha, self.lora_dropout, split_comma_list(self.lora_target)
        )

    def input_paths(self) -> dict[str, str | None]:
        """Flag -> the path the run reads (a resume needs their files unchanged)."""
        return {"--train_file": self.train_file, "--pretrain_dataset_dir": self.pretrain_dataset_dir,
                "--actor_ckpt_dir": self.actor_ckpt_dir, "--critic_ckpt_dir": self.critic_ckpt_dir,
                "--reward_model_ckpt_dir": self.reward_model_ckpt_dir}  # fmt: skip


@dataclass
class TPPPOTrainingArguments(PPOTrainingArguments):
    output_dir: str | None = field(
        default=None, metadata={"help": "metrics.jsonl and checkpoint-N/ (default: <actor_save_dir>_run)"}
    )


def check_loop_flags(ppo: PPOArguments, args: TPPPOTrainingArguments) -> None:
    """What ``run_ppo_with_peft.py``'s up-front validation checks of the loop flags both stages share: a
    ``--save_steps 0`` or ``--logging_steps 0`` would otherwise stop the run after its first optimizer
    step (a division by zero), before any checkpoint."""
    check_positive_flags(
        {
            "--logging_steps": args.logging_steps,
            "--save_steps": args.save_steps,
            "--gradient_accumulation_steps": args.gradient_accumulation_steps,
            "--per_device_mini_train_batch_size": ppo.per_device_mini_train_batch_size,
            "--max_buffer_size (--rollout_batches)": ppo.rollout_batches,
            "--ppo_epochs": ppo.ppo_epochs,
            "--max_gen_len": ppo.max_response_length,
            "--max_prompt_length": ppo.max_prompt_length,
        }
    )
    check_sampling_flags(ppo, "--max_gen_len (--max_response_length)")
    check_kl_horizon(ppo, rollout_size(ppo, args))
    check_old_logprobs(ppo, args)
    check_training_ranges(args)


# run_ppo_with_peft.py's flags that the description's --max_batch_size, --max_buffer_size, --max_gen_len set
PAIRED_FLAGS = (
    "per_device_train_batch_size", "per_device_mini_train_batch_size", "rollout_batches", "max_response_length"
)  # fmt: skip


def given_flags(argv: list[str]) -> frozenset[str]:
    """Names of the flags ``argv`` spells out, as the dataclass fields they set: ``--name v``,
    ``--name=v``, ``--na-me v``, an unambiguous prefix (argparse takes those too), or the keys of the one
    YAML/JSON config file that stands for the flags."""
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_argv(argv[0])
    known = {f.name for kind in (TPPPOArguments, PPOArguments, TPPPOTrainingArguments) for f in fields(kind)}
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].partition("=")[0].replace("-", "_")
        matches = [name] if name in known else [k for k in known if k.startswith(name)]
        given.update(matches[:1] if len(matches) == 1 else [])
    return frozenset(given)


def refuse_two_values(flag: str, value: int, other: str, other_value: int, what: str) -> None:
    """The description's ``flag`` and ``run_ppo_with_peft.py``'s ``other`` both set ``what``."""
    if value != other_value:
        raise ConfigError(
            f"--{flag} {value} and --{other} {other_value} both set {what}: pass one of them, or the same value"
        )


def check_precision_flags(dtype: str, args: TPPPOTrainingArguments) -> None:
    """``--fp16`` / ``--bf16`` (``run_ppo_with_peft.py``'s autocast flags) against the TP backend, which has
    no autocast: it computes in its weights' dtype, which ``--dtype`` sets (bfloat16 on a GPU by default).
    ``--bf16`` agrees with ``--dtype auto`` or ``bfloat16`` and is accepted; ``--fp16`` is refused (no fp16
    loss scaling here), and so is ``--bf16`` beside another ``--dtype``, rather than ignored."""
    if args.fp16:
        raise ConfigError(
            "--fp16: the tensor-parallel backend has no fp16 autocast or loss scaling; it computes in the "
            "weights' dtype, set by --dtype (bfloat16 on a GPU by default)"
        )
    if args.bf16 and dtype not in ("auto", "bfloat16"):
        raise ConfigError(
            f"--bf16 with --dtype {dtype}: the tensor-parallel backend computes in the weights' dtype, which "
            "--dtype sets; drop --bf16 or pass --dtype bfloat16"
        )


def apply_description_flags(
    tp: TPPPOArguments,
    ppo: PPOArguments,
    args: TPPPOTrainingArguments,
    given: Collection[str] | None = None,
) -> None:
    """Map the description's flags onto the PPO stage's; check what the TP engine cannot do.

    ``--max_batch_size``, ``--max_buffer_size`` and ``--max_gen_len`` set ``run_ppo_with_peft.py``'s
    ``--per_device_train_batch_size`` and ``--per_device_mini_train_batch_size``, ``--rollout_batches`` and
    ``--max_response_length``: whichever of a pair is given wins; both given (``given``: the field names
    the command line spelt out, :func:`given_flags`; by default those not at their defaults) must agree."""
    if given is None:
        defaults = {f.name: f.default for f in fields(PPOArguments) + fields(TPPPOTrainingArguments)}
        given = {n for n in PAIRED_FLAGS if getattr(ppo if hasattr(ppo, n) else args, n) != defaults[n]}
    if not tp.reward_model_ckpt_dir and not tp.reward_fn:
        raise ConfigError("pass --reward_model_ckpt_dir (a verifier), --reward_fn gsm8k, or both")
    validate_estimator(ppo)
    check_profile_step(args.profile_step)
    if ppo.generation_lora != "unmerged" or ppo.generation_compile:
        flag = "--generation_lora merged" if ppo.generation_lora != "unmerged" else "--generation_compile"
        raise ConfigError(
            f"{flag}: the static engine on a Hugging Face model only (not the tensor-parallel model)"
        )
    if args.torch_compile or args.torch_compile_backend is not None:
        raise ConfigError(TORCH_COMPILE_REFUSED)
    check_precision_flags(tp.dtype, args)
    if ppo.needs_critic and not (tp.critic_ckpt_dir and tp.critic_save_dir):
        raise ConfigError(
            f"--advantage_estimator {ppo.advantage_estimator} trains a critic: pass --critic_ckpt_dir and "
            "--critic_save_dir"
        )
    if not ppo.needs_critic:
        ignored = [f"--{name}" for name in ("critic_ckpt_dir", "critic_save_dir") if getattr(tp, name)]
        if ignored:
            logger.warning(
                "--advantage_estimator %s trains no critic: %s not used (nothing is loaded or written there)",
                ppo.advantage_estimator, " and ".join(ignored),
            )  # fmt: skip
    k = ppo.num_samples_per_prompt
    batch_flag = "--per_device_train_batch_size"
    if tp.max_batch_size is not None:
        batch_flag = "--max_batch_size"
        if "per_device_train_batch_size" in given:
            refuse_two_values(
                "max_batch_size", tp.max_batch_size, "per_device_train_batch_size",
                args.per_device_train_batch_size, "the prompts per generation batch",
            )  # fmt: skip
        if "per_device_mini_train_batch_size" in given:
            refuse_two_values(
                "max_batch_size", tp.max_batch_size, "per_device_mini_train_batch_size",
                ppo.per_device_mini_train_batch_size, "the samples per PPO mini-batch",
            )  # fmt: skip
        args.per_device_train_batch_size = ppo.per_device_mini_train_batch_size = tp.max_batch_size
    check_positive_flags({batch_flag: args.per_device_train_batch_size})  # divides what follows
    if ppo.per_device_mini_train_batch_size <= 0:
        ppo.per_device_mini_train_batch_size = args.per_device_train_batch_size * k
    if tp.max_buffer_size is not None:
        generation_batch = args.per_device_train_batch_size * k
        if tp.max_buffer_size % generation_batch:
            raise ConfigError(
                f"--max_buffer_size {tp.max_buffer_size} must be a multiple of {batch_flag} "
                f"{args.per_device_train_batch_size} x --num_samples_per_prompt {k}"
            )
        rollout_batches = tp.max_buffer_size // generation_batch
        if "rollout_batches" in given and ppo.rollout_batches != rollout_batches:
            raise ConfigError(
                f"--max_buffer_size {tp.max_buffer_size} ({rollout_batches} generation batches of {batch_flag} "
                f"{args.per_device_train_batch_size} x --num_samples_per_prompt {k}) and --rollout_batches "
                f"{ppo.rollout_batches} both set the rollout size: pass one of them, or values that agree"
            )
        ppo.rollout_batches = rollout_batches
    if rollout_size(ppo, args) % ppo.per_device_mini_train_batch_size:
        raise ConfigError(
            f"--per_device_mini_train_batch_size {ppo.per_device_mini_train_batch_size} must divide the "
            f"rollout size {rollout_size(ppo, args)}"
        )
    if tp.max_gen_len is not None:
        if "max_response_length" in given:
            refuse_two_values(
                "max_gen_len", tp.max_gen_len, "max_response_length", ppo.max_response_length,
                "the new tokens per response",
            )  # fmt: skip
        ppo.max_response_length = tp.max_gen_len
    if ppo.pretrain_batch_size <= 0:
        ppo.pretrain_batch_size = ppo.per_device_mini_train_batch_size
    check_loop_flags(ppo, args)
    check_positive_flags({"--block_size": tp.block_size})
    if args.do_eval:
        check_eval_split(tp.split_ratio)
    actor_save_dir = Path(tp.actor_save_dir).resolve()  # "." has no name to append to
    args.output_dir = args.output_dir or str(actor_save_dir.with_name(actor_save_dir.name + "_run"))
    check_save_dirs(tp, args, ppo.needs_critic)


def check_save_dirs(tp: TPPPOArguments, args: TPPPOTrainingArguments, needs_critic: bool) -> None:
    """The actor's and the critic's save dirs are replaced as a whole at the end: each a directory of its
    own (:func:`rlhf.tp.shard_dir.check_save_dir`), neither holding the other nor ``--output_dir`` (whose
    checkpoints would go with it)."""
    saves = {"--actor_save_dir": tp.actor_save_dir}
    if needs_critic and tp.critic_save_dir:
        saves["--critic_save_dir"] = tp.critic_save_dir
    runs = {
        "--output_dir": args.output_dir,
        "--resume_from_checkpoint": named_checkpoint(args.resume_from_checkpoint),
    }
    for flag, save_dir in saves.items():
        others = {name: path for name, path in saves.items() if name != flag}
        check_save_dir(save_dir, flag, tp.input_paths() | others | runs)


def run(
    tp: TPPPOArguments,
    ppo: PPOArguments,
    args: TPPPOTrainingArguments,
    given: Collection[str] | None = None,
) -> PPOSession:
    apply_description_flags(tp, ppo, args, given)
    # the newest checkpoint in --output_dir unless --overwrite_output_dir, as run_ppo_with_peft.py does
    resume = resume_checkpoint(args)
    check_settings_before_loading(resume, flag_settings(args, ppo, tp.input_paths()))
    session = build_tp_session(tp, ppo, args)
    if resume is None:
        start_afresh(Path(args.output_dir), session.backend)
    train(session, resume_from=resume)
    models, backend = session.models, session.backend
    actor_dir = Path(tp.actor_save_dir)
    critic_dir = Path(tp.critic_save_dir) if models.has_critic else None

    def export() -> None:
        models.save_actor(actor_dir)
        if critic_dir is not None:
            models.save_critic(critic_dir)

    backend.run_export(export)
    metrics = Path(args.output_dir) / "metrics.jsonl"
    if backend.is_main and metrics.is_file():
        (actor_dir / "training").mkdir(exist_ok=True)
        write_text_atomic(actor_dir / "training" / "metrics.jsonl", metrics.read_text())  # whole or absent
        logger.info("actor saved to %s, critic to %s", actor_dir, critic_dir or "- (no critic)")
    backend.end()  # trackers finish; every rank waits for the others
    return session


@exit_on_user_error
def main(argv: list[str] | None = None) -> PPOSession:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    tp, ppo, args = parse_args((TPPPOArguments, PPOArguments, TPPPOTrainingArguments), argv)
    with (
        process_group_scope()
    ):  # tears the groups down before exit (gloo threads abort at shutdown otherwise)
        return run(tp, ppo, args, given_flags(argv))


if __name__ == "__main__":
    main()
