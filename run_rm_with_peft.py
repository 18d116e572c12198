"""Stage 2: reward-model training (full, or LoRA with the score head saved in the adapter).

Single device::

    python run_rm_with_peft.py --model_name_or_path SFT_MODEL --dataset_dir rm_data --output_dir runs/rm \\
        --do_train --do_eval --lora_rank 8 --max_length 512

Accelerate / torchrun (add ``--deepspeed configs/ds_zero2.json`` for ZeRO)::

    accelerate launch run_rm_with_peft.py ...
    torchrun --nnodes 1 --nproc_per_node 2 run_rm_with_peft.py ...

Every flag of ``transformers.TrainingArguments`` works, plus the model, data and LoRA flags of
``rlhf.args`` and ``--max_length`` / ``--center_rewards_coefficient`` / ``--padding_side`` /
``--overwrite_output_dir`` / ``--packing`` (with ``--packed_attention``). See ``docs/reward_model.md``.
"""

from __future__ import annotations

from transformers import TrainingArguments

from rlhf.args import LoraArguments, ModelArguments, parse_args
from rlhf.errors import exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.reward import RewardArguments, RewardDataArguments, run_reward


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    model_args, data_args, lora_args, rm_args, training_args = parse_args(
        (ModelArguments, RewardDataArguments, LoraArguments, RewardArguments, TrainingArguments), argv
    )
    return run_reward(model_args, data_args, lora_args, rm_args, training_args)


if __name__ == "__main__":
    main()
