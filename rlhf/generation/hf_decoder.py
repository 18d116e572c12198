"""The engine's model side for Hugging Face causal LMs: llama, mistral (sliding window), mixtral, qwen2.

The step runs the model's own modules (embedding, rotary embedding, norms, q/k/v/o projections, MLP or
sparse-MoE block, LM head) in :class:`rlhf.generation.decoder.Decoder`'s layer loop. Under PEFT the LoRA
layers wrap those projections, so the active adapter applies, unmerged, exactly as in a training forward;
which adapters are active (and whether they are disabled or merged) is part of :meth:`state_key`, so a
CUDA graph captured for the actor is never replayed for the reference policy.

Sliding windows follow the config: ``layer_types`` (qwen2) names the windowed layers, otherwise a
``sliding_window`` applies to every layer (mistral). The window counts positions of real tokens, so a
left-padded row attends as it would unpadded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from rlhf.generation.decoder import Decoder, LayerParts
from rlhf.models.lora_forward import reading_rollout_copies, refresh_rollout_copies
from rlhf.models.rope import HOST_ROPE, rope_type

FAMILIES = ("llama", "mistral", "mixtral", "qwen2")
DATA_DEPENDENT = ("mixtral",)  # expert routing picks rows on the host: no CUDA graph


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM under DistributedDataParallel and PeftModel wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the engine cannot run this model (None when it can)."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"the static engine runs {', '.join(FAMILIES)} models, not {model_type or type(lm).__name__}"
    if not callable(getattr(lm, "get_output_embeddings", None)) or lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no LM head"
    return None


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


def _scales(layer: nn.Module) -> tuple:
    """A LoRA layer's ``scaling`` per adapter: floats its forward multiplies by, constants in a captured
    graph (PEFT's ``set_scale`` changes them)."""
    scaling = getattr(layer, "scaling", None)
    return tuple(sorted(scaling.items())) if isinstance(scaling, dict) else ()


class HFDecoder(Decoder):
    """See the module docstring. ``model``: the causal LM, or a PeftModel / DDP wrapping it."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.module = model
        lm = unwrap(model)
        config = lm.config
        self.body = lm.model
        self.lm_head = lm.get_output_embeddings()
        self.capturable = config.model_type not in DATA_DEPENDENT and not any(
            k in rope_type(model) for k in HOST_ROPE
        )
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        windows = layer_windows(config)
        self.layers = [
            LayerParts(
                attention_norm=layer.input_layernorm,
                q_proj=layer.self_attn.q_proj,
                k_proj=layer.self_attn.k_proj,
                v_proj=layer.self_attn.v_proj,
                o_proj=layer.self_attn.o_proj,
                mlp_norm=layer.post_attention_layernorm,
                mlp=layer.mlp,
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                scale=getattr(layer.self_attn, "scaling", None),
                window=windows[index],
            )
            for index, layer in enumerate(self.body.layers[: config.num_hidden_layers])
        ]
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._copies_dtype: torch.dtype | None = None  # autocast's dtype at the last refresh

    def refresh(self) -> None:
        """Under autocast, the adapters' weights in its dtype for the steps to read
        (:func:`rlhf.models.lora_forward.refresh_rollout_copies`): no cast of each adapter matrix at every
        decode step. Without autocast PEFT computes the adapters in their own dtype: no copies."""
        device_type = self.device.type
        autocast = torch.is_autocast_enabled(device_type)
        self._copies_dtype = torch.get_autocast_dtype(device_type) if autocast else None
        if self._copies_dtype is not None:
            refresh_rollout_copies(self.module, self._copies_dtype)

    def generating(self) -> AbstractContextManager:
        dtype = self._copies_dtype
        return reading_rollout_copies(dtype) if dtype is not None else nullcontext()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(tokens)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body.rotary_emb(h, positions)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body.norm(h))

    def state_key(self) -> tuple:
        adapters = tuple(
            (tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged), _scales(m))
            for m in self._tuners
        )
        return (self.module.training, adapters)
