"""``--torch_compile`` for the PPO stage: each decoder layer's forward through ``torch.compile``, one compiled
function shared by all the layers of a model (regional compilation).

Outside its matmuls a training step of a LoRA model is memory-bound passes over the activations: norms,
RoPE, the SiLU gate, residual adds, the adapters' dropout and adds, in the forward and again in the backward
(``bench/lora_traffic.py``). Inductor fuses those chains into a few kernels per layer. Compiling the layer
rather than the whole model keeps the compile to one layer's code (all layers of a model run the same
compiled graphs, their weights being inputs), leaves the embedding, the masks and the heads eager, and lets
the PPO loop switch adapters between forwards.

What a compiled graph bakes in, and so what makes another one: the active adapter (actor, critic, reward,
or none for the reference), grad mode, train/eval mode, whether there is an attention mask (the pretraining
loss has none). A PPO run of the gae estimator makes 7 or 8 graphs (shapes are dynamic from the start:
rollout lengths change from step to step), each compiled once, at its first use: the cold start of a run,
measured by ``bench/ppo.py``'s compiled rows. With gradients on, a layer whose input needs none (the first
layer of a LoRA model, after the frozen embedding) runs eagerly instead of making a graph of its own
(under ``--gradient_checkpointing`` its input is marked as needing one, and it is compiled like the rest).

- Forwards with a KV cache (Hugging Face ``generate``: ``--generation_engine hf``) run the layer eagerly: the
  cache's Python state would make a graph per layer and step. The static engine does not call the layers.
- Gradient checkpointing keeps working: the compiled forward is what the checkpoint runs and recomputes,
  with the model's own checkpoint function (ours: the adapter of the forward is set again for the recompute).
- Values: the same function of the weights; inductor's fusions round differently (float32: within 1e-5).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")
RECOMPILE_LIMIT = 64  # graphs per compiled function: adapters x grad modes x dynamic-shape specialisations
_compiled: dict[tuple[Callable, str], Callable] = {}  # (a layer class's forward, backend) -> compiled


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM, under PeftModel / DDP wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"--torch_compile: {type(lm).__name__} has no decoder layers at .model.layers (the Hugging Face "
            "llama, mistral, mixtral, qwen2, ... families have)"
        )
    return list(layers)


def _plain_forward(layer: nn.Module) -> Callable:
    """The layer class's own forward, without transformers' gradient-checkpointing wrapper."""
    forward = type(layer).forward
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    return forward


def _compiled_forward(forward: Callable, backend: str) -> Callable:
    key = (forward, backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(forward, backend=backend, dynamic=True)
    return _compiled[key]


@functools.cache
def _warn_cache_once() -> None:
    logger.warning(
        "--torch_compile: a training forward with a KV cache runs the layers eagerly (use_cache=False)"
    )


def _run_layer(layer: nn.Module, compiled: Callable, *args: Any, **kwargs: Any) -> Any:
    eager = type(layer).forward  # the class's own (with transformers' checkpointing wrapper)
    if any(kwargs.get(name) is not None for name in CACHE_KWARGS):  # generate's KV cache
        if torch.is_grad_enabled() and layer.training:  # not generate: a forward that forgot use_cache=False
            _warn_cache_once()
        return eager(layer, *args, **kwargs)
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        # gradient checkpointing's input hook marks the embedding's output even without gradients: the same
        # graph as the other layers', rather than one more per adapter
        hidden = hidden.detach()
        args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
    if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        # the first layer of a LoRA model's update (its input, the frozen embedding's output, needs no
        # gradient): eager, rather than one more graph to compile per adapter for one layer in N
        return eager(layer, *args, **kwargs)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(compiled, layer, **kwargs), *args)
    return compiled(layer, *args, **kwargs)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Run every decoder layer of ``model`` through one ``torch.compile`` of its class's forward (see the
    module docstring); return how many layers. The layers, their weights and the checkpoints are unchanged
    (a forward of each instance's own, in place of the class's)."""
    layers = decoder_layers(model)
    dynamo_config = torch._dynamo.config
    # torch < 2.7 calls the limit cache_size_limit
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))
    for layer in layers:
        layer.forward = functools.partial(
            _run_layer, layer, _compiled_forward(_plain_forward(layer), backend)
        )
    logger.info("--torch_compile: %d decoder layers run one compiled forward (%s)", len(layers), backend)
    return len(layers)
