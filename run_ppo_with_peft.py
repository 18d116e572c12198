"""Stage 3: PPO on one frozen base with ``actor``/``critic``/``reward`` adapters (see docs/ppo.md).

Single device:
    python run_ppo_with_peft.py --sft_model_path SFT --reward_lora_path RM --dataset_dir sft_data \\
        --output_dir out/actor --critic_output_dir out/critic --max_steps 100

Accelerate (the reference command; default_config.yaml = one process, GPU if present):
    accelerate launch --config_file default_config.yaml run_ppo_with_peft.py --model_type llama \\
        --sft_model_path SFT --reward_lora_path RM --dataset_dir sft_data --pretrain_dataset_dir pt_data \\
        --per_device_train_batch_size 2 --per_device_mini_train_batch_size 2 --gradient_accumulation_steps 2 \\
        --output_dir out/actor --critic_output_dir out/critic ...

Several processes (CPU gloo or GPU NCCL):
    torchrun --nproc_per_node 2 run_ppo_with_peft.py ...same flags...

Critic-free (GRPO, 4 responses per prompt; no critic is built or saved):
    python run_ppo_with_peft.py ... --advantage_estimator grpo --num_samples_per_prompt 4
"""

from __future__ import annotations

from pathlib import Path

from rlhf.args import parse_args
from rlhf.errors import exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.ppo.config import (
    PPOArguments,
    PPODataArguments,
    PPOModelArguments,
    PPOTrainingArguments,
    check_eval_split,
    critic_output_dir,
    input_paths,
    validate,
)
from rlhf.ppo.loop import save_outputs, train
from rlhf.ppo.peft_factory import actor_lora_spec, build_peft_session, critic_lora_spec
from rlhf.ppo.resume import (
    check_settings_before_loading,
    flag_settings,
    resume_checkpoint,
    start_afresh,
)

ARGUMENT_GROUPS = (PPOModelArguments, PPODataArguments, PPOArguments, PPOTrainingArguments)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Parse flags, build the session, train, save. Returns the final training state as a dict."""
    setup_logging()
    model_args, data_args, ppo_args, train_args = parse_args(ARGUMENT_GROUPS, argv)
    validate(model_args, ppo_args, train_args, data_args.dataset_dir)
    if train_args.do_eval:
        check_eval_split(data_args.split_ratio)
    actor_lora_spec(model_args)  # a bad --actor_lora_* or --critic_lora_* value fails before any model loads
    if ppo_args.needs_critic:
        critic_lora_spec(model_args)
    critic_dir = critic_output_dir(model_args, train_args) if ppo_args.needs_critic else None
    # an earlier run's newest checkpoint in --output_dir, unless --overwrite_output_dir (checked up front)
    resume = resume_checkpoint(train_args)
    inputs = input_paths(model_args, data_args.dataset_dir)
    check_settings_before_loading(resume, flag_settings(train_args, ppo_args, inputs))

    session = build_peft_session(data_args, model_args, ppo_args, train_args)
    if resume is None:
        start_afresh(Path(train_args.output_dir), session.backend)
    state = train(session, resume_from=resume)
    save_outputs(session, critic_dir)
    session.backend.end()
    return dict(state.__dict__)


if __name__ == "__main__":
    main()
