"""The causal-LM loss straight from the last hidden states: no ``[tokens, vocab]`` float32 logits.

``loss = sum_i CE(W h_i + b, y_i) / n`` over the tokens whose shifted label ``y_i`` is not -100, with
``n`` the number of such tokens (or Trainer's ``num_items_in_batch`` over the accumulated batch), the
same value as transformers' ``ForCausalLMLoss`` on the model's logits. Two implementations:

- ``torch`` (:class:`ChunkedLinearCrossEntropy`): plain PyTorch. Masked tokens (the prompt) are dropped
  first; the rest go through ``lm_head`` in chunks, each chunk's logits live only while its log-sum-exp
  is taken, and the backward recomputes them chunk by chunk. Memory: one chunk of logits instead of all.
- ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA only), when installed.

:class:`CausalLMHeadLoss` plugs either into ``transformers.Trainer`` as ``compute_loss_func``: the model
runs with ``logits_to_keep`` empty (its ``lm_head`` projects nothing) and returns its hidden states.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMPLEMENTATIONS = ("auto", "torch", "liger", "off")
CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk


def chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about ``budget_bytes``."""
    return max(64, budget_bytes // (4 * vocab_size))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, V) float32 logits of one chunk; the matmul runs in the weights' (or autocast's) dtype."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, computed in token chunks.

    forward(hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int64, chunk) -> scalar float32
    sum over all N rows (every target must be a real class). Backward recomputes each chunk's logits:
    ``d logits = softmax - onehot``, ``d hidden = d logits @ W``, ``d W = d logits.T @ hidden``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk], weight, bias)
            picked = logits.gather(1, targets[start : start + chunk, None]).squeeze(1)
            total = total + (torch.logsumexp(logits, dim=1) - picked).sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start : start + ctx.chunk]
            d_logits = torch.softmax(_chunk_logits(h, weight, bias), dim=1)
            d_logits[torch.arange(len(h), device=h.device), targets[start : start + ctx.chunk]] -= 1.0
            d_logits = d_logits * grad_total
            if need_b:
                grad_b += d_logits.sum(0)
            d_logits = d_logits.to(weight.dtype)  # matmuls in the forward's dtype (autocast may lower it)
            if need_h:
                grad_h[start : start + ctx.chunk] = (d_logits @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (d_logits.t() @ h.to(weight.dtype)).float()
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B*T,) next-token targets: position t learns ``labels[t + 1]``; the last, -100."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.reshape(-1)


def _liger_sum(hidden, weight, bias, targets) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
        weight, hidden, targets, bias
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    implementation: str = "torch",
    chunk: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss from hidden states: ``ForCausalLMLoss(lm_head(hidden), labels)`` without the logits.

    - ``hidden``: (B, T, H) last hidden states (after the final norm), ``weight``: (V, H), ``bias``: (V,) or None;
    - ``labels``: (B, T) with -100 where nothing is learned (prompt, padding, a packed document's first token);
    - ``num_items_in_batch``: divisor (learned tokens over the accumulated batch); None = mean over this batch.
    Returns a float32 scalar.
    """
    targets = shift_targets(labels.to(hidden.device))
    keep = targets != IGNORE_INDEX
    # float32 hidden states next to bf16/fp16 weights (Accelerate's mixed precision): the head runs in the
    # weights' dtype on every path
    rows = hidden.reshape(-1, hidden.shape[-1])[keep].to(weight.dtype)
    targets = targets[keep]
    if implementation == "liger":
        total = _liger_sum(rows, weight, bias, targets)
    else:
        total = ChunkedLinearCrossEntropy.apply(
            rows, weight, bias, targets, chunk or chunk_rows(weight.shape[0])
        )
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def output_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, H), bias or None) of the model's ``lm_head`` as the forward uses it, or None if unsupported.

    Handles a plain ``nn.Linear`` and PEFT's ``ModulesToSaveWrapper`` (``--modules_to_save lm_head``);
    returns None for a LoRA-wrapped ``lm_head`` and for DeepSpeed ZeRO-3 partitioned weights.
    """
    head = model.get_output_embeddings()
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = getattr(head, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) and active else active
        disabled = getattr(head, "disable_adapters", False)
        head = (
            head.original_module
            if disabled or active not in head.modules_to_save
            else head.modules_to_save[active]
        )
    if not isinstance(head, torch.nn.Linear) or hasattr(head.weight, "ds_id"):
        return None
    return head.weight, head.bias


def resolve_implementation(requested: str, device_type: str) -> str:
    """``auto`` -> ``liger`` on CUDA when liger-kernel (and the Triton it runs on) is installed, else
    ``torch``; checks the others."""
    if requested not in IMPLEMENTATIONS:
        raise ConfigError(f"--fused_loss must be one of {', '.join(IMPLEMENTATIONS)}; got {requested!r}")
    has_liger = all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))
    if requested == "auto":
        return "liger" if device_type == "cuda" and has_liger else "torch"
    if requested == "liger" and not (device_type == "cuda" and has_liger):
        raise ConfigError(
            "--fused_loss liger needs a GPU and the liger-kernel package with Triton (pip install liger-kernel)"
        )
    return requested


def install_hidden_state_hooks(model: torch.nn.Module) -> None:
    """Install transformers' hidden-state recording hooks now, eagerly.

    transformers installs them on the first ``output_hidden_states`` forward, under a lock that
    ``torch.compile`` cannot trace: the compiled forward would fall back to eager for good. As transformers
    does, they go on the innermost recording models only (the decoder body, whose forward collects them):
    installing on the causal LM around it as well would hook every layer twice once the body has been
    hooked by an earlier forward (transformers' recursion does not check), and the hidden states would
    come back twice, their indices off.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:  # other transformers versions record hidden states without hooks
        return

    def records_hidden_states(module: torch.nn.Module) -> bool:
        # older transformers (5.20 has it) key a plain dict by the class's name; later ones take the module
        key = str(module.__class__) if type(_CAN_RECORD_REGISTRY) is dict else module
        return "hidden_states" in (_CAN_RECORD_REGISTRY.get(key) or {})

    recording = [m for m in model.modules() if records_hidden_states(m)]
    for module in recording:
        below = {id(m) for m in module.modules() if m is not module}
        if not any(id(other) in below for other in recording):
            maybe_install_capturing_hooks(module)


class CausalLMHeadLoss:
    """``compute_loss_func`` for ``transformers.Trainer``: the LM loss from the model's last hidden states.

    ``model_kwargs(device)`` are the extra forward arguments the Trainer subclass passes: no logits,
    hidden states returned. A Mixtral router loss (``aux_loss``, with ``output_router_logits``) is added
    with the model's ``router_aux_loss_coef``, as its own forward does.
    """

    def __init__(self, model: torch.nn.Module, implementation: str):
        self.model = model
        self.implementation = implementation
        install_hidden_state_hooks(model)

    def model_kwargs(self, device: torch.device) -> dict[str, Any]:
        # -1: the last hidden state only (the others come back as None). With True every layer's would be
        # returned, and under --bf16/--fp16 Accelerate converts each one it returns to float32: (layers + 1)
        # x tokens x hidden x 4 bytes more at the peak, several times the logits this loss avoids. A
        # transformers without index selection treats -1 as True (the last one is the same).
        return {
            "logits_to_keep": torch.empty(0, dtype=torch.long, device=device),
            "output_hidden_states": -1,
        }

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        weight, bias = output_projection(self.model)
        loss = linear_cross_entropy(
            outputs.hidden_states[-1], weight, bias, labels, num_items_in_batch, self.implementation
        )
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            share = router_loss_share(labels, num_items_in_batch)
            loss = loss + router_loss_coef(self.model) * aux_loss.to(loss.device) * share
        return loss


def router_loss_coef(model: torch.nn.Module) -> float:
    """A mixture-of-experts model's ``router_aux_loss_coef`` (the model reads it from its config at init)."""
    coef = getattr(model, "router_aux_loss_coef", None)  # a PeftModel passes both lookups to its base
    return model.config.router_aux_loss_coef if coef is None else coef


def router_loss_share(labels: torch.Tensor, num_items_in_batch: Any) -> Any:
    """The weight of one micro-batch's router (load-balancing) loss: its share of the optimizer step's
    learned tokens, ``num_items_in_batch`` (1 when the Trainer counts none).

    The Trainer treats a loss computed with ``num_items_in_batch`` as already divided over the gradient
    accumulation steps (and multiplies it by the number of processes before they are averaged): right for
    the token-summed cross-entropy, but a per-micro-batch mean such as the router loss then counted
    ``--gradient_accumulation_steps`` x processes times. Weighted by the token share, the micro-batches'
    router losses add up to their token-weighted mean once per step, whatever the batch layout.
    """
    if num_items_in_batch is None:
        return 1.0
    tokens = shift_targets(labels).ne(IGNORE_INDEX).sum()
    return tokens.to(torch.float32) / torch.as_tensor(num_items_in_batch, device=tokens.device).float()


def build_lm_head_loss(model: torch.nn.Module, requested: str = "auto") -> CausalLMHeadLoss | None:
    """The fused loss for ``model``, or None (the model's own loss) when ``--fused_loss off`` or unsupported."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    implementation = resolve_implementation(requested, device_type)
    if implementation == "off":
        return None
    if is_deepspeed_zero3_enabled():
        logger.info(
            "--fused_loss: ZeRO-3 partitions lm_head outside its forward; the model's own loss is used"
        )
        return None
    if output_projection(model) is None:
        logger.warning("--fused_loss %s: the lm_head is not a plain (or modules_to_save) Linear, "
                       "so the model's own loss is used", requested)  # fmt: skip
        return None
    logger.info("LM loss: fused linear cross-entropy (%s)", implementation)
    return CausalLMHeadLoss(model, implementation)


class HiddenStatesLossMixin:
    """A ``transformers.Trainer`` mixin that changes only the loss: with a :class:`CausalLMHeadLoss` as
    ``compute_loss_func`` the model is asked for its hidden states instead of logits.

    Everything else (label popping, ``num_items_in_batch``, gradient accumulation and cross-device
    scaling) is Trainer's own. With ``return_outputs`` (evaluation) the outputs hold the loss and the
    model's empty ``(B, 0, V)`` logits, so evaluation gathers no logits and no hidden states.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head_loss = self.compute_loss_func
        if not isinstance(head_loss, CausalLMHeadLoss):
            return self._model_loss(model, inputs, return_outputs, num_items_in_batch)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        inputs = {**inputs, **head_loss.model_kwargs(inputs["input_ids"].device)}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        return (loss, CausalLMOutputWithPast(loss=loss, logits=outputs.logits)) if return_outputs else loss

    def _model_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The model's own loss (``--fused_loss off``), its router loss weighted as :func:`router_loss_share`
        says: transformers' mixture-of-experts models add ``coef * aux_loss`` whole to a loss the Trainer
        then takes as divided over the accumulation steps. (Under label smoothing the Trainer's smoother
        replaces the model's loss, router loss and all.)"""
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        aux_loss = getattr(outputs, "aux_loss", None)
        counted_whole = self.label_smoother is None and self.model_accepts_loss_kwargs
        if aux_loss is not None and labels is not None and num_items_in_batch is not None and counted_whole:
            scale = 1
            if self.args.average_tokens_across_devices:  # as Trainer.compute_loss scaled the whole loss
                scale = self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu
            excess = 1 - router_loss_share(labels, num_items_in_batch)
            coef = router_loss_coef(self.accelerator.unwrap_model(model))
            loss = loss - scale * coef * aux_loss.to(loss.device) * excess
        return (loss, outputs) if return_outputs else loss
