"""RMSNorm as one fused call: ``F.rms_norm``, outside autocast, for the Hugging Face models we train and
sample from, and for the rollout engine's merged decoder.

Hugging Face's ``LlamaRMSNorm`` (and mistral's, mixtral's, qwen2's) is ``weight * (x.float() *
rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``: a cast, a square, a mean, an add, an rsqrt, two products and
a cast back, each a pass over the activations in float32, and as many again in the backward. On CUDA,
``F.rms_norm`` is one fused kernel each way (``aten::_fused_rms_norm`` and its backward) that accumulates in
float32 and rounds once; on CPU it is the same ops as the module. It is called outside autocast when the
input and the weight share a dtype, because CUDA autocast runs ``rms_norm`` in float32 (``AT_FORALL_FP32``
of ATen's ``autocast_mode.h``): it would cast the input and the weight to float32 and return float32, which
the next matmuls cast back, for the same result.

Values: equal to the module's in float32 (to float rounding); in bf16 the weight is applied before the
single rounding instead of after a first one (within one bf16 step, ``tests/test_fused_rms_norm.py``). An
input in another dtype than the weight keeps the module's own forward (autocast then picks the dtype).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dimension, as one ``F.rms_norm`` outside autocast (``x`` and
    ``weight`` in one dtype)."""
    if x.device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(x.device.type):
        # no autocast to leave (or none there at all: meta)
        return F.rms_norm(x, tuple(weight.shape), weight, eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, tuple(weight.shape), weight, eps)


def is_plain_rms_norm(module: nn.Module) -> bool:
    """A Hugging Face llama/mistral/mixtral/qwen2 RMSNorm (``weight``, ``variance_epsilon``)."""
    return type(module).__name__ in FAMILIES and hasattr(module, "variance_epsilon")


def forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward a plain RMSNorm gets (bound to it). Named ``forward``: a pickled norm reloads with its
    class's own forward (a bound method pickles as ``getattr(module, name)``), the same values unfused."""
    if hidden_states.dtype != module.weight.dtype:
        return type(module).forward(module, hidden_states)
    return fused_rms_norm(hidden_states, module.weight, module.variance_epsilon)


def use_fused_rms_norm(model: nn.Module) -> int:
    """Run every plain RMSNorm of ``model`` (:func:`is_plain_rms_norm`) as :func:`fused_rms_norm`; return how
    many. The modules, their class and their weights stay as they are (a forward of the instance's own: a
    method bound to it, so that ``torch.compile`` sees one function for every norm, not one per instance)."""
    norms = [m for m in model.modules() if is_plain_rms_norm(m)]
    for norm in norms:
        norm.forward = types.MethodType(forward, norm)
    return len(norms)
