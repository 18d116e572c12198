"""The engine's Hugging Face model side with the LoRA adapters folded into a copy of the weights.

:class:`~rlhf.generation.hf_decoder.HFDecoder` runs each projection as the PEFT layer it is: the base GEMM
plus, per active adapter, two small GEMMs, a scale and an add. At rollout batch sizes those extra kernels
cost about as much as the base GEMMs. :class:`MergedLoraDecoder` instead keeps, per decoder layer, one
fused q/k/v matrix, the o projection, one fused gate/up matrix and the down projection, each equal to
``W + sum of the active adapters' delta weights`` (computed in float32, rounded once to the model's
dtype), and runs a layer in four GEMMs; its RMSNorms run as single ``F.rms_norm`` calls, and RoPE rotates
the q and k heads in one pass.

The copy is refreshed in place before every generation (:meth:`refresh`), from whatever the adapters hold
then and whichever are active (none when disabled, as for the reference policy): an optimizer step on
the actor is seen by the next rollout, and the refreshed tensors keep their addresses, so captured CUDA
graphs replay on the new values. Costs: memory for one more copy of the adapted projections (about the
size of the model's linear layers in its dtype) and one small GEMM per projection per refresh. The
sampled tokens' log-probs come from the merged weights, so they differ from a training forward (which
runs the adapters unmerged) by the rounding of the merge: nothing in float32, about bf16's precision in
bf16.

Dense models only (llama, mistral, qwen2): a mixture-of-experts layer has no single MLP to fold.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.generation.hf_decoder import HFDecoder, unwrap
from rlhf.models.fused_rms_norm import fused_rms_norm, is_plain_rms_norm

logger = logging.getLogger(__name__)


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` under a PEFT tuner layer (or the module itself)."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"merged weights need linear projections, found {type(base).__name__}")
    return base


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W + sum of the active LoRA delta weights`` of one projection, in float32 (W alone when the
    adapters are disabled or already merged into W)."""
    weight = base_linear(module).weight.float()
    if module is base_linear(module) or module.disable_adapters or module.merged:
        return weight
    delta = torch.zeros_like(weight)
    for name in module.active_adapters:
        if name not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError("merged weights: DoRA adapters are not supported (use unmerged)")
        delta += module.get_delta_weight(name).float()
    return weight + delta


class FusedLinear:
    """``F.linear`` over a weight (and bias) we own; ``parts`` projections stacked along the output dim."""

    def __init__(self, parts: list[nn.Module], dtype: torch.dtype, device: torch.device) -> None:
        self.parts = parts
        sizes = [base_linear(p).out_features for p in parts]
        self.weight = torch.empty(sum(sizes), base_linear(parts[0]).in_features, dtype=dtype, device=device)
        has_bias = [base_linear(p).bias is not None for p in parts]
        self.bias = torch.zeros(sum(sizes), dtype=dtype, device=device) if any(has_bias) else None
        self.sizes = sizes

    def cast(self, dtype: torch.dtype) -> None:
        """Hold the copy in ``dtype`` from now on (new tensors; :meth:`refresh` fills them)."""
        self.weight = torch.empty_like(self.weight, dtype=dtype)
        self.bias = None if self.bias is None else torch.empty_like(self.bias, dtype=dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        start = 0
        for part, size in zip(self.parts, self.sizes):
            self.weight[start : start + size].copy_(effective_weight(part))
            bias = base_linear(part).bias
            if bias is not None:
                self.bias[start : start + size].copy_(bias)
            start += size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.numel() * self.weight.element_size() + bias


class FusedRMSNorm:
    """A Hugging Face ``*RMSNorm`` as one ``F.rms_norm`` call outside autocast
    (:func:`rlhf.models.fused_rms_norm.fused_rms_norm`; the module's own forward for an input in another dtype
    than its weight). The weight is read from the module at each call."""

    def __init__(self, norm: nn.Module) -> None:
        self.norm, self.eps = norm, norm.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.norm.weight
        if x.dtype != weight.dtype:  # autocast (when on) picks the dtype, as for the module
            return F.rms_norm(x, tuple(weight.shape), weight, self.eps)
        return fused_rms_norm(x, weight, self.eps)


def fused_norm(norm: nn.Module):
    """:class:`FusedRMSNorm` for the llama/mistral/qwen2 RMSNorm; any other norm is kept as it is."""
    return FusedRMSNorm(norm) if is_plain_rms_norm(norm) else norm


class MergedMLP:
    """``down(act(gate(x)) * up(x))`` with gate and up in one GEMM."""

    def __init__(self, mlp: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], dtype, device)
        self.down = FusedLinear([mlp.down_proj], dtype, device)
        self.act = mlp.act_fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the merged copy cannot serve ``model`` (None when it can): a mixture-of-experts MLP, DoRA."""
    lm = unwrap(model)
    mlps = [layer.mlp for layer in lm.model.layers]
    if any(not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) for mlp in mlps):
        return f"{lm.config.model_type} has no dense gate/up/down MLP (mixture of experts)"
    if any(any(getattr(m, "use_dora", {}).values()) for m in model.modules()):
        return "DoRA adapters are not supported"
    return None


class MergedLoraDecoder(HFDecoder):
    """See the module docstring. ``model``: the causal LM, or a PeftModel / DDP wrapping it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"merged weights: {reason}; use unmerged")
        body_layers = self.body.layers[: len(self.layers)]
        # the dtype the steps compute in (built under the rollout's autocast, as the engines are): float32
        # weights under --bf16 get a bf16 copy, not a float32 one cast to bf16 again at every step
        dtype, device = self.compute_dtype(), self.device
        self.final_norm = fused_norm(self.body.norm)
        self.fused: list[FusedLinear] = []
        for parts, layer in zip(self.layers, body_layers):
            attn = layer.self_attn
            parts.qkv_proj = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], dtype, device)
            parts.o_proj = FusedLinear([attn.o_proj], dtype, device)
            parts.mlp = MergedMLP(layer.mlp, dtype, device)
            parts.attention_norm = fused_norm(layer.input_layernorm)
            parts.mlp_norm = fused_norm(layer.post_attention_layernorm)
            self.fused += [parts.qkv_proj, parts.o_proj, parts.mlp.gate_up, parts.mlp.down]
        self.refresh()
        logger.info(
            "rollout engine: LoRA folded into a %.1f MiB copy of the projections (refreshed per generation)",
            sum(f.nbytes for f in self.fused) / 2**20,
        )

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(h))

    def generating(self) -> AbstractContextManager:
        return nullcontext()  # the steps read the merged copy, not the adapters

    def refresh(self) -> None:
        dtype = self.compute_dtype()
        if self.fused[0].weight.dtype != dtype:
            # built under another autocast than this generation's (the engine re-allocates its KV cache and
            # drops its graphs for the same reason): a copy in the dtype the steps compute in now
            for fused in self.fused:
                fused.cast(dtype)
        # outside any autocast of the caller: the deltas (B @ A) are formed in float32, as documented
        with torch.autocast(self.device.type, enabled=False):
            for fused in self.fused:
                fused.refresh()
