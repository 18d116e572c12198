"""Which weights a stage trains: a new LoRA adapter, an existing adapter (``--peft_path``), or all of them.

``--lora_rank N`` (N > 0) wraps the model in a fresh adapter on ``--lora_target`` (plus
``--modules_to_save`` and the stage's own head, trained in full); ``--lora_rank -1`` or ``0`` trains every
weight, as in the Llama-RLHF description; ``--peft_path DIR`` loads an existing adapter trainable and
continues it (its own rank and targets win over the LoRA flags).
"""

from __future__ import annotations

import logging

import torch
from peft import PeftModel, TaskType, get_peft_model

from rlhf.errors import CheckpointError, ConfigError
from rlhf.models import is_adapter_dir
from rlhf.models.fused_rms_norm import use_fused_rms_norm
from rlhf.models.loading import adapter_task_type, check_adapter_weights, recorded_base_path
from rlhf.models.lora import LoraSpec, build_lora_config
from rlhf.models.lora_forward import use_fast_lora_forward

logger = logging.getLogger(__name__)


def weights_dtype(torch_dtype: str | None, use_lora: bool) -> str:
    """The ``--torch_dtype`` name to load weights in; trained weights are never float16.

    Full fine-tuning keeps float32 master weights under ``--torch_dtype float16`` (mixed precision comes
    from ``--fp16``); with LoRA the frozen base may be float16 and PEFT keeps the adapter in float32.
    Without a GPU, :func:`rlhf.models.resolve_dtype` turns half precision into float32 with one warning.
    ``auto`` is resolved later, from the checkpoint's config; a float16 checkpoint trained in full is then
    upcast by :func:`make_trainable`.
    """
    if torch_dtype == "float16" and not use_lora and torch.cuda.is_available():
        logger.warning(
            "--torch_dtype float16 with full fine-tuning: weights are kept in float32 (use --fp16)"
        )
        return "float32"
    return torch_dtype or "auto"


def make_trainable(
    model: torch.nn.Module,
    lora: LoraSpec,
    *,
    modules_to_save: list[str] | None = None,
    peft_path: str | None = None,
    task_type: TaskType = TaskType.CAUSAL_LM,
    head_modules: tuple[str, ...] = (),
    gradient_checkpointing: bool = False,
    fp16: bool = False,
    bf16: bool = False,
) -> torch.nn.Module:
    """Return ``model`` ready to train: wrapped in a (new or loaded) adapter, or unchanged for full training.

    Whether a new adapter is made is decided by ``lora.use_lora`` alone (``rank <= 0`` = full training).
    ``modules_to_save`` (``--modules_to_save``) and ``head_modules`` (such as the reward model's ``score``)
    are trained in full and saved with the adapter. With ``fp16`` (``--fp16`` mixed precision) trainable
    float16 weights are upcast to float32 (:func:`upcast_float16_trainable`); with ``bf16`` (``--bf16``) so
    are an adapter's fully trained bfloat16 companions (the reward model's ``score`` head,
    ``--modules_to_save``), which PEFT copies in the base's dtype: AdamW's steps of about the learning rate
    are far below one bf16 step of a weight, so a bf16 head would barely move. Full fine-tuning in bf16 stays
    bf16 (as ``transformers.Trainer`` trains a bf16 model); full fine-tuning never keeps float16 weights,
    whatever dtype the model was loaded in (a float16 checkpoint under ``--torch_dtype auto``): they are
    upcast to float32 master weights, and ``--fp16`` gives the mixed precision.
    """
    use_fused_rms_norm(model)  # one F.rms_norm per norm (a fused kernel each way on CUDA)
    if peft_path:
        if not is_adapter_dir(peft_path):
            raise CheckpointError(
                f"--peft_path {peft_path}: not an adapter directory (no adapter_config.json)"
            )
        check_adapter_task(peft_path, task_type)
        check_adapter_weights(peft_path, "--peft_path")
        model = PeftModel.from_pretrained(model, peft_path, is_trainable=True)
        logger.info("continuing adapter %s", peft_path)
    elif lora.use_lora:
        check_modules_to_save(model, modules_to_save or [])
        extra = list(dict.fromkeys([*(modules_to_save or []), *head_modules]))
        config = build_lora_config(
            model,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            targets=lora.targets,
            modules_to_save=extra,
            task_type=task_type,
        )
        model = get_peft_model(model, config)
    if isinstance(model, PeftModel):
        # the base this run loaded (not a continued adapter's old record), absolute: loads from any directory
        base = getattr(model.get_base_model(), "name_or_path", None)
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = recorded_base_path(base or adapter.base_model_name_or_path)
        use_fast_lora_forward(model)  # no float32 round trip of the input under autocast, one addmm
    if fp16:
        upcast_float16_trainable(model)
    elif not isinstance(model, PeftModel):
        upcast_trainable(model, torch.float16, "full fine-tuning")
    if bf16 and isinstance(model, PeftModel):
        upcast_trainable(model, torch.bfloat16, "--bf16")
    if gradient_checkpointing and isinstance(model, PeftModel):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    trainable, total = count_parameters(model)
    mode = "LoRA" if isinstance(model, PeftModel) else "full"
    logger.info(
        "%s training: %d of %d parameters trainable (%.2f%%)",
        mode,
        trainable,
        total,
        100 * trainable / max(total, 1),
    )
    return model


def check_adapter_task(peft_path: str, task_type: TaskType) -> None:
    """CheckpointError when the adapter at ``--peft_path`` was trained for another task (an SFT
    ``CAUSAL_LM`` adapter given to the reward model, whose head PEFT would fail on with an AttributeError)."""
    recorded = adapter_task_type(peft_path)
    expected = TaskType(task_type).value
    if recorded and recorded != expected:
        hint = ""
        if (recorded, expected) == (TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value):
            hint = "; to start a reward model from an SFT adapter, pass it as --model_name_or_path"
        raise CheckpointError(
            f"--peft_path {peft_path}: a {recorded} adapter (task_type in adapter_config.json), but this stage "
            f"continues {expected} adapters{hint}"
        )


def check_modules_to_save(model: torch.nn.Module, names: list[str]) -> None:
    """ConfigError naming the first ``--modules_to_save`` name that matches no module of ``model`` (PEFT's
    rule: a module whose dotted name ends with it), which PEFT would otherwise skip without a word."""
    keys = [key for key, _ in model.named_modules(remove_duplicate=False) if key]
    for name in names:
        if not any(key.endswith(name) for key in keys):
            available = sorted(
                {key.rsplit(".", 1)[-1] for key in keys if not key.rsplit(".", 1)[-1].isdigit()}
            )
            raise ConfigError(
                f"--modules_to_save {name} matches no module of this model (available: {', '.join(available)})"
            )
    if not names or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embeddings.weight:
        named = {key.rsplit(".", 1)[-1] for key, m in model.named_modules() if m in (output, embeddings)}
        for name in names:
            if name in named:
                logger.warning(
                    "--modules_to_save %s: the model ties its output layer to its input embeddings, and a trained "
                    "copy of one of them unties the pair: the adapter's model no longer shares them", name,
                )  # fmt: skip


def upcast_float16_trainable(model: torch.nn.Module) -> int:
    """Cast trainable float16 parameters to float32 in place; return how many were cast.

    ``--fp16`` scales the loss with a GradScaler, which refuses float16 gradients ("Attempting to unscale
    FP16 gradients"). PEFT keeps LoRA weights in float32 but copies ``modules_to_save`` (the reward
    model's ``score`` head) in the base's float16; under fp16 autocast a float32 master copy computes in
    float16 anyway. Frozen weights stay as loaded.
    """
    return upcast_trainable(model, torch.float16, "--fp16")


def upcast_trainable(model: torch.nn.Module, dtype: torch.dtype, flag: str) -> int:
    """Cast trainable ``dtype`` parameters to float32 in place (logged under ``flag``); return how many."""
    cast = 0
    for param in model.parameters():
        # ZeRO-3 partitions (``ds_id``) are left to DeepSpeed, which keeps its own float32 master copy
        if param.requires_grad and param.dtype == dtype and not hasattr(param, "ds_id"):
            param.data = param.data.float()
            cast += 1
    if cast:
        name = str(dtype).removeprefix("torch.")
        logger.info("%s: %d trainable %s tensors kept in float32 (master weights)", flag, cast, name)
    return cast


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes also under ZeRO-3, where local tensors are empty)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
