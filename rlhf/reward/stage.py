"""The reward-model stage: a one-output sequence classifier trained on preference pairs.

Outputs in ``--output_dir``: with LoRA ``adapter_config.json`` + ``adapter_model.safetensors`` holding the
adapter and the trained ``score`` head (always in ``modules_to_save``); with ``--lora_rank -1`` a plain HF
``*ForSequenceClassification`` model dir. Always the tokenizer and ``trainer_state.json`` (loss,
``eval_accuracy``, ``eval_margin``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow.compute as pc
from peft import TaskType
from transformers import TrainingArguments, set_seed

from rlhf.args import DataArguments, LoraArguments, ModelArguments
from rlhf.data import load_dataset_dir, split_dataset
from rlhf.data.sequences import warn_beyond_context
from rlhf.errors import ConfigError
from rlhf.models import load_tokenizer
from rlhf.models.adapter_base import merged_source_under_zero3, write_base_if_adapter_source
from rlhf.models.loading import model_context_length
from rlhf.reward.model import HEAD_NAMES, check_head_for_evaluation, load_reward_backbone, pad_apart_from_eos
from rlhf.reward.packing import PackedPairCollator
from rlhf.reward.pairs import PairCollator, clean_pairs, tokenize_pairs
from rlhf.reward.trainer import RewardTrainer
from rlhf.training import make_trainable, weights_dtype
from rlhf.training.packed_attention import BACKENDS as PACKED_BACKENDS
from rlhf.training.packed_attention import FLAG_HELP as PACKED_ATTENTION_HELP
from rlhf.training.packed_attention import use_packed_attention
from rlhf.training.runner import prepare_run, run_trainer, stage_inputs

logger = logging.getLogger(__name__)


@dataclass
class RewardDataArguments(DataArguments):
    """The shared data flags, with ``--block_size`` as the reward model reads it."""

    block_size: int = field(
        default=512,
        metadata={
            "help": "Maximum tokens of a response alone (cut on the right; then the prompt is cut from the left to fit --max_length)."
        },
    )


@dataclass
class RewardArguments:
    max_length: int = field(
        default=1024, metadata={"help": "Maximum tokens of prompt + response (one side)."}
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of the mean squared (r_chosen + r_rejected) term; 0 disables."}
    )
    padding_side: str = field(
        default="right", metadata={"help": "Where batches are padded.", "choices": ["right", "left"]}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if --output_dir holds checkpoints (they are deleted)."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Put the chosen and rejected sides of a batch in one padding-free row (no padding)."
        },
    )
    packed_attention: str = field(
        default="auto", metadata={"help": PACKED_ATTENTION_HELP, "choices": list(PACKED_BACKENDS)}
    )


def build_reward_data(
    data_args: DataArguments,
    rm_args: RewardArguments,
    tokenizer: Any,
    args: TrainingArguments,
    context_length: int | None = None,
):
    """(train, eval or None) tokenized pairs; rank 0 prepares them first, the others reuse its cache.

    A side longer than ``context_length`` (the model's ``max_position_embeddings``; by default read from the
    dir the tokenizer was loaded from) is one warning naming ``--max_length``."""
    if rm_args.max_length < 2 or data_args.block_size < 1:
        raise ConfigError("--max_length must be >= 2 and --block_size >= 1")
    with args.main_process_first(desc="loading and tokenizing preference pairs"):
        rows = clean_pairs(load_dataset_dir(data_args.dataset_dir, "preference", data_args.data_cache_dir))
        # split before the cut drops pairs, so the held-out pairs do not depend on the length flags
        train_rows, eval_rows = split_dataset(rows, data_args.split_ratio, args.seed)
        tokenize = partial(
            tokenize_pairs,
            tokenizer=tokenizer,
            max_length=rm_args.max_length,
            max_response=data_args.block_size,
            num_proc=data_args.preprocessing_num_workers,
        )
        train = tokenize(train_rows, split="training " if eval_rows is not None else "")
        held_out = None if eval_rows is None else tokenize(eval_rows, split="held-out ")
    longest = max(
        pc.max(pc.list_value_length(pairs.with_format("arrow")[side])).as_py()
        for pairs in (train, held_out) if pairs is not None for side in ("chosen_ids", "rejected_ids")
    )  # fmt: skip
    if context_length is None:
        context_length = model_context_length(getattr(tokenizer, "name_or_path", None))
    warn_beyond_context(longest, context_length, "--max_length", rm_args.max_length)
    return train, held_out


def build_reward_model(
    model_args: ModelArguments, lora_args: LoraArguments, tokenizer: Any, args: TrainingArguments
):
    """The reward model with a new score head and its trainable weights set up.

    An SFT adapter dir as ``--model_name_or_path`` is merged into the backbone; under ZeRO-3 first, outside
    it, into ``<output_dir>/base_model`` (:func:`merged_source_under_zero3`): its score head is then the one
    the main process drew with ``--seed``, loaded by every process."""
    lora = lora_args.lora_spec()
    use_lora = lora.use_lora or bool(model_args.peft_path)
    load = partial(
        load_reward_backbone,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=weights_dtype(model_args.torch_dtype, use_lora),
        model_type=model_args.model_type,
        trust_remote_code=model_args.trust_remote_code,
    )
    set_seed(args.seed)  # a new adapter and score head start from the same weights for the same --seed
    source = merged_source_under_zero3(model_args.model_name_or_path, args.output_dir, load, args, tokenizer)
    set_seed(args.seed)
    model = load(source)
    heads = tuple(name for name in HEAD_NAMES if hasattr(model, name))
    return make_trainable(
        model,
        lora,
        modules_to_save=lora_args.extra_modules,
        peft_path=model_args.peft_path,
        task_type=TaskType.SEQ_CLS,
        head_modules=heads,
        gradient_checkpointing=args.gradient_checkpointing,
        fp16=args.fp16,
        bf16=args.bf16,
    )


def run_reward(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    rm_args: RewardArguments,
    args: TrainingArguments,
) -> dict[str, Any]:
    """Run the whole stage; returns the train/eval metrics."""
    if not args.do_train and not model_args.peft_path:  # evaluation only: the stored head scores
        check_head_for_evaluation(model_args.model_name_or_path)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_args.trust_remote_code, rm_args.padding_side
    )
    pad_apart_from_eos(tokenizer)
    train_data, eval_data = build_reward_data(data_args, rm_args, tokenizer, args)
    inputs = stage_inputs(model_args, data_args)
    resume_from = prepare_run(args, eval_data is not None, rm_args.overwrite_output_dir, inputs)
    model = build_reward_model(model_args, lora_args, tokenizer, args)
    write_base_if_adapter_source(
        model, model_args.model_name_or_path, args.output_dir, tokenizer, args.process_index == 0
    )
    if rm_args.packing:
        use_packed_attention(model, rm_args.packed_attention, args.bf16 or args.fp16)
        collator = PackedPairCollator()
    else:
        collator = PairCollator(tokenizer.pad_token_id, rm_args.padding_side)
    trainer = RewardTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        center_rewards_coefficient=rm_args.center_rewards_coefficient,
    )
    return run_trainer(trainer, resume_from, rm_args.overwrite_output_dir, inputs)
