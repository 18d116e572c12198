"""Stage 1: supervised fine-tuning (full or LoRA) with a response-only loss.

Single device::

    python run_sft_with_peft.py --model_name_or_path MODEL --dataset_dir sft_data --output_dir runs/sft \\
        --do_train --lora_rank 8 --lora_target q_proj,v_proj

Accelerate / torchrun (add ``--deepspeed configs/ds_zero2.json`` for ZeRO)::

    accelerate launch run_sft_with_peft.py ...
    torchrun --nnodes 1 --nproc_per_node 2 run_sft_with_peft.py ...

Every flag of ``transformers.TrainingArguments`` works, plus the model, data and LoRA flags of
``rlhf.args`` and ``--overwrite_output_dir`` / ``--packing``. See ``docs/sft.md``.
"""

from __future__ import annotations

from transformers import TrainingArguments

from rlhf.args import DataArguments, LoraArguments, ModelArguments, parse_args
from rlhf.errors import exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.sft import SFTArguments, run_sft


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    model_args, data_args, lora_args, sft_args, training_args = parse_args(
        (ModelArguments, DataArguments, LoraArguments, SFTArguments, TrainingArguments), argv
    )
    return run_sft(model_args, data_args, lora_args, sft_args, training_args)


if __name__ == "__main__":
    main()
