"""The SFT stage: build the model, the data and a ``transformers.Trainer``, train, save.

Outputs in ``--output_dir``: with LoRA ``adapter_config.json`` + ``adapter_model.safetensors``; with full
fine-tuning a plain HF model dir (``config.json`` + ``model.safetensors``); always the tokenizer,
``trainer_state.json`` (loss history), ``train_results.json`` and ``checkpoint-N/`` every ``--save_steps``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft import TaskType
from transformers import Trainer, TrainingArguments, set_seed

from rlhf.args import DataArguments, LoraArguments, ModelArguments
from rlhf.data import load_dataset_dir, split_dataset
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.models.adapter_base import merged_source_under_zero3, write_base_if_adapter_source
from rlhf.sft.batching import PaddedCollator, packed_collator
from rlhf.sft.evaluation import lm_example_losses, sft_metrics
from rlhf.sft.examples import tokenize_sft_dataset
from rlhf.training import AtomicCheckpointMixin, FiniteLossMixin, make_trainable, weights_dtype
from rlhf.training.fused_loss import (
    IGNORE_INDEX,
    CausalLMHeadLoss,
    HiddenStatesLossMixin,
    build_lm_head_loss,
    output_projection,
    shift_targets,
)
from rlhf.training.fused_loss import IMPLEMENTATIONS as LOSS_IMPLEMENTATIONS
from rlhf.training.packed_attention import BACKENDS as PACKED_BACKENDS
from rlhf.training.packed_attention import FLAG_HELP as PACKED_ATTENTION_HELP
from rlhf.training.packed_attention import use_packed_attention
from rlhf.training.runner import prepare_run, run_trainer, stage_inputs

logger = logging.getLogger(__name__)


@dataclass
class SFTArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if --output_dir holds checkpoints (they are deleted)."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Concatenate each batch into one padding-free row; examples never attend to each other."
        },
    )
    packed_attention: str = field(
        default="auto",
        metadata={
            "help": PACKED_ATTENTION_HELP,
            "choices": list(PACKED_BACKENDS),
        },
    )
    fused_loss: str = field(
        default="auto",
        metadata={
            "help": "LM loss from the hidden states without [tokens, vocab] logits: auto (liger-kernel on a GPU "
            "when installed, else torch), torch (chunked), liger, off (the model's own loss).",
            "choices": list(LOSS_IMPLEMENTATIONS),
        },
    )


class SFTTrainer(FiniteLossMixin, AtomicCheckpointMixin, HiddenStatesLossMixin, Trainer):
    """``transformers.Trainer`` with atomic checkpoints and the non-finite loss guard; the loss (labels carry
    -100) is the fused one of ``compute_loss_func`` (:mod:`rlhf.training.fused_loss`) or the model's own.
    ``eval_loss`` is the mean token loss over all held-out examples (:mod:`rlhf.sft.evaluation`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", sft_metrics)
        super().__init__(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(E, 2) [summed token loss, learned tokens] of the batch's E examples as predictions, even when
        only the loss is asked for, and no loss: :func:`sft_metrics` computes it from the gathered rows."""
        inputs = self._prepare_inputs(inputs)
        head_loss = self.compute_loss_func
        fused = isinstance(head_loss, CausalLMHeadLoss)
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        if fused:
            model_inputs.update(head_loss.model_kwargs(inputs["input_ids"].device))
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**model_inputs)
            source = outputs.hidden_states[-1] if fused else outputs.logits
            projection = output_projection(head_loss.model) if fused else None
            rows = lm_example_losses(inputs, source, projection, self.args.label_smoothing_factor)
        return None, rows, torch.zeros(len(rows), device=rows.device)


class LabelSmoothedHeadLoss(CausalLMHeadLoss):
    """The fused loss with ``--label_smoothing_factor`` ε: the value of Trainer's ``LabelSmoother``,
    ``(1 - ε) CE + ε mean_v(-log p_v)``, still without ``[tokens, vocab]`` logits.

    Per learned token with logits ``z``, ``mean_v(-log p_v) = logsumexp(z) - mean_v z = CE + z_y - mean_v z``,
    so smoothing adds ``ε (z_y - mean_v z)``: the hidden state against the target's row and the mean row of
    the ``lm_head`` (plus the bias), divided like the loss (``num_items_in_batch`` or this batch's tokens).
    """

    def __init__(self, head_loss: CausalLMHeadLoss, epsilon: float):
        vars(self).update(vars(head_loss))  # same model and implementation; its hooks are installed
        self.epsilon = epsilon

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        loss = super().__call__(outputs, labels, num_items_in_batch)
        weight, bias = output_projection(self.model)
        hidden = outputs.hidden_states[-1]
        targets = shift_targets(labels.to(hidden.device))
        keep = targets != IGNORE_INDEX
        rows = hidden.reshape(-1, hidden.shape[-1])[keep].float()
        targets = targets[keep]
        gap = (rows * (weight[targets].float() - weight.mean(0).float())).sum(-1)
        if bias is not None:
            gap = gap + bias[targets].float() - bias.float().mean()
        divisor = keep.sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(divisor):
            divisor = divisor.to(gap.device)
        return loss + self.epsilon * gap.sum() / divisor


def build_sft_loss(model: torch.nn.Module, fused_loss: str, label_smoothing: float):
    """``compute_loss_func`` for the Trainer: the fused loss (label-smoothed under
    ``--label_smoothing_factor``), or None for the model's own loss, which the Trainer's ``LabelSmoother``
    smooths itself."""
    head_loss = build_lm_head_loss(model, fused_loss)
    if head_loss is None or not label_smoothing:
        return head_loss
    logger.info("LM loss: label smoothing %g in the fused loss", label_smoothing)
    return LabelSmoothedHeadLoss(head_loss, label_smoothing)


def build_sft_data(data_args: DataArguments, tokenizer: Any, args: TrainingArguments):
    """(train, eval or None) tokenized datasets; rank 0 tokenizes first, the others reuse its cache."""
    with args.main_process_first(desc="loading and tokenizing SFT data"):
        rows = load_dataset_dir(data_args.dataset_dir, "sft", data_args.data_cache_dir)
        examples = tokenize_sft_dataset(
            rows, tokenizer, data_args.block_size, data_args.preprocessing_num_workers
        )
    return split_dataset(examples, data_args.split_ratio, args.seed)


def build_sft_model(
    model_args: ModelArguments, lora_args: LoraArguments, args: TrainingArguments, tokenizer: Any = None
):
    """The causal LM with its trainable weights set up (new LoRA, ``--peft_path`` adapter, or full).

    An adapter dir as ``--model_name_or_path`` is merged into its base; under ZeRO-3 first, outside it, into
    ``<output_dir>/base_model`` (:func:`merged_source_under_zero3`, which saves ``tokenizer`` there)."""
    lora = lora_args.lora_spec()
    use_lora = lora.use_lora or bool(model_args.peft_path)
    load = partial(
        load_causal_lm,
        flag="--model_name_or_path",
        torch_dtype=weights_dtype(model_args.torch_dtype, use_lora),
        model_type=model_args.model_type,
        trust_remote_code=model_args.trust_remote_code,
        merge_adapter=True,
    )
    source = merged_source_under_zero3(model_args.model_name_or_path, args.output_dir, load, args, tokenizer)
    set_seed(args.seed)  # a new adapter starts from the same weights for the same --seed
    model = load(source)  # Trainer sets config.use_cache from --use_cache; the final save turns it back on
    return make_trainable(
        model,
        lora,
        modules_to_save=lora_args.extra_modules,
        peft_path=model_args.peft_path,
        task_type=TaskType.CAUSAL_LM,
        gradient_checkpointing=args.gradient_checkpointing,
        fp16=args.fp16,
        bf16=args.bf16,
    )


def run_sft(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    sft_args: SFTArguments,
    args: TrainingArguments,
) -> dict[str, Any]:
    """Run the whole stage; returns the train/eval metrics."""
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_args.trust_remote_code, padding_side="right"
    )
    train_data, eval_data = build_sft_data(data_args, tokenizer, args)
    inputs = stage_inputs(model_args, data_args)
    resume_from = prepare_run(args, eval_data is not None, sft_args.overwrite_output_dir, inputs)
    model = build_sft_model(model_args, lora_args, args, tokenizer)
    write_base_if_adapter_source(
        model, model_args.model_name_or_path, args.output_dir, tokenizer, args.process_index == 0
    )
    if sft_args.packing:
        collator = packed_collator(
            use_packed_attention(model, sft_args.packed_attention, args.bf16 or args.fp16)
        )
    else:
        collator = PaddedCollator(tokenizer.pad_token_id)
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        compute_loss_func=build_sft_loss(model, sft_args.fused_loss, args.label_smoothing_factor),
    )
    return run_trainer(trainer, resume_from, sft_args.overwrite_output_dir, inputs)
