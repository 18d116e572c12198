"""How our PEFT LoRA layers run: without PEFT's float32 round trip of the input under autocast, and with the
adapter's scaled output added inside its last matmul.

PEFT's vanilla ``Linear`` forward, for a base ``W`` and an adapter ``B A`` with scale ``s``, is
``W x + B(A(dropout(x.to(float32)))) * s``: under ``--bf16``/``--fp16`` autocast the input is cast to the
adapter's float32 and straight back, and the product ``B h`` is written, scaled and added in two more passes
over the layer's output. In a training step those passes move more bytes than the layer's own matmuls
(``bench/lora_traffic.py``), and in a rollout decode step each is a kernel (``bench/decode_kernels.py``).
:func:`use_fast_lora_forward` makes every vanilla LoRA ``Linear`` of a model:

- skip the input cast while autocast is on (PEFT's own ``cast_input_dtype_enabled`` switch; outside autocast
  the cast stays, since the input must then match the adapter's float32 weights);
- compute ``W x + s * (h @ B^T)`` as one ``addmm`` on the base output (the scale as the matmul's ``alpha``):
  no separate product, scale or add over ``[tokens, out]``, in the forward or the backward. It is a PEFT
  :class:`~peft.tuners.lora.layer.LoraVariant` of its own, so merging, unmerging, mixed-adapter batches and
  saving behave as for vanilla LoRA (to rounding: the sum is rounded once).

The same function of the weights: in float32 equal to PEFT's forward up to float rounding (``s`` applied to
the product instead of its result), under bf16 autocast the sum is rounded once instead of three times
(``tests/test_lora_forward.py``). LoRA dropout > 0 runs in the activations' dtype under autocast, as for an
adapter PEFT keeps in that dtype. Adapters with ``lora_bias`` or another variant (DoRA, ...) keep PEFT's
forward, and so does an adapter whose weights DeepSpeed ZeRO-3 partitions (only its module call gathers them).

For the rollout engine, :func:`refresh_rollout_copies` and :func:`reading_rollout_copies` keep the adapters'
weights in autocast's dtype for its decode steps (see the comment above them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant


def _autocast_on(device_type: str | None = None) -> bool:
    """Whether autocast is on for ``device_type`` (``None``: for CUDA or the CPU)."""
    if device_type is None:
        return _autocast_on("cuda") or _autocast_on("cpu")
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


class _CastOutsideAutocast:
    """The value of PEFT's ``cast_input_dtype_enabled`` on our LoRA layers: true, as PEFT's default, except
    under autocast (PEFT reads it at every forward)."""

    def __bool__(self) -> bool:
        return not _autocast_on()

    def __repr__(self) -> str:
        return "outside autocast"


_CAST_OUTSIDE_AUTOCAST = _CastOutsideAutocast()


class FusedOutputLora(LoraVariant):
    """Vanilla LoRA whose scaled output is added by the adapter's second matmul (``addmm``)."""

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        return None  # installed on an adapter PEFT has already built

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)  # as PEFT's vanilla merge

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # in place: the weight keeps its address (a captured CUDA graph reads it there)
        orig_weight.data -= module.get_delta_weight(active_adapter).to(orig_weight.dtype)
        return orig_weight.data

    @staticmethod
    def forward(
        module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        autocast = _autocast_on(x.device.type)
        casts = module.cast_input_dtype_enabled is not False  # a user's False (PEFT's switch) is kept
        if casts and not autocast and x.dtype != lora_A.weight.dtype:
            # PEFT's cast, where our switch skipped it for another device's autocast
            x = x.to(lora_A.weight.dtype)
        x = module.lora_dropout[active_adapter](x)
        scale = module.scaling[active_adapter]
        reading = _reading_copies is not None and autocast and not torch.is_grad_enabled()
        copies = module.__dict__.get(_COPIES, {}).get(_reading_copies) if reading else None
        if copies and active_adapter in copies:  # the rollout engine's decode steps (no gradients, autocast)
            a, b = copies[active_adapter]
            return _add_product(result, F.linear(x, a), b, scale)
        h = lora_A(x)  # called as a module, so its hooks run
        if not _plain_linear(lora_B) or (result.dtype != h.dtype and not autocast):
            return result + lora_B(h) * scale  # PEFT's sum (also a bf16 base with a float32 adapter)
        return _add_product(result, h, lora_B.weight, scale)


def _plain_linear(module: torch.nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is all there without calling it: not wrapped or swapped by FSDP (FSDP1
    wraps it, FSDP2 changes its class), no hooks (DeepSpeed ZeRO-3 gathers a partitioned weight in one)."""
    return (
        type(module) is torch.nn.Linear
        and not module._forward_pre_hooks
        and not module._forward_hooks
        and "forward" not in module.__dict__  # Accelerate's offload hooks replace the forward
        and not hasattr(module, "_hf_hook")
        and not hasattr(module.weight, "ds_id")
    )


def _add_product(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + scale * h @ b.T`` as one ``addmm``: result [..., out], h [..., r], b [out, r]."""
    flat = result.reshape(-1, result.shape[-1])
    return torch.addmm(flat, h.reshape(-1, h.shape[-1]), b.t(), alpha=scale).view(result.shape)


def use_fast_lora_forward(model: torch.nn.Module) -> int:
    """Give every vanilla LoRA ``Linear`` of ``model`` the forward of the module docstring; return how many
    adapters (layer x adapter) got the fused output add. Adapters added afterwards keep PEFT's forward."""
    fused = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        if layer.cast_input_dtype_enabled is not False:  # a user's False is kept
            layer.cast_input_dtype_enabled = _CAST_OUTSIDE_AUTOCAST
        for name in layer.lora_A:
            if name not in layer.lora_variant and not layer.lora_bias.get(name, False):  # vanilla LoRA
                layer.lora_variant[name] = FusedOutputLora()
                fused += 1
    return fused


# The rollout engine's copies of the adapters' weights in its compute dtype (under --bf16: bf16 copies of the
# float32 adapters). Under autocast each decode step would otherwise cast every adapter matrix again: two
# kernels per adapted projection that a CUDA graph replays at every token (the graphs are captured without
# autocast's weight-cast cache, so that an optimizer step's in-place update is seen). The copies are
# refreshed in place before each generation and never reallocated (one set per dtype; new adapter weights
# mean new parameters, which a captured graph's weight check refuses), so captured graphs read the new
# values. They are read only inside :func:`reading_rollout_copies`: nothing else (training, the rollout's
# other forwards) sees them. They round exactly as autocast's cast does: the same tokens and log-probs.
_COPIES = "_rlhf_rollout_copies"  # layer attribute: {dtype: {adapter: (A, B)}}
_reading_copies: torch.dtype | None = None  # process-wide (autocast is per thread): one generation at a time


def refresh_rollout_copies(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Copy every adapter with our forward whose weights are not in ``dtype`` to ``dtype`` (made on the
    first call, updated in place after); return how many adapters have copies."""
    count = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        copies = layer.__dict__.setdefault(_COPIES, {}).setdefault(dtype, {})
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if a.dtype == dtype or not isinstance(layer.lora_variant.get(name), FusedOutputLora):
                # e.g. adapters cast to ``dtype`` since: an older copy must not be read
                copies.pop(name, None)
                continue
            held = copies.get(name)
            if held is None or held[0].shape != a.shape or held[0].device != a.device:
                held = copies[name] = (torch.empty_like(a, dtype=dtype), torch.empty_like(b, dtype=dtype))
            with torch.no_grad():
                held[0].copy_(a)
                held[1].copy_(b)
            count += 1
    return count


@contextmanager
def reading_rollout_copies(dtype: torch.dtype) -> Iterator[None]:
    """Within: the adapters' forward reads the ``dtype`` copies :func:`refresh_rollout_copies` made (the
    engine's generation, under autocast to ``dtype``)."""
    global _reading_copies
    before, _reading_copies = _reading_copies, dtype
    try:
        yield
    finally:
        _reading_copies = before
