"""Hugging Face <-> shard key names per family, and a Hugging Face config -> :class:`ModelArgs`.

Shards keep the original llama key names (``tok_embeddings``, ``layers.{i}.attention.wq``, ``feed_forward.w1``,
``output``, ...). A table maps each HF key template to one shard key, or to several when HF fuses them (the
original Qwen's ``c_attn`` holds q, k and v stacked on dim 0). ``{i}`` is a layer, ``{e}`` an expert.

Which way each shard key is split (:func:`shard_dim`):

- column-parallel (dim 0, output features): ``wq``, ``wk``, ``wv`` (and their biases), ``w1``, ``w3``, ``output``;
- row-parallel (dim 1, input features): ``wo``, ``w2``;
- ``tok_embeddings``: dim 1 as the llama model splits it; with tied embeddings dim 0 (the vocabulary), so
  the output layer shares the shard;
- everything else (norms, the mixtral router, row-parallel biases, a verifier's ``v_head``) is replicated.

A scalar-head shard dir (verifier, critic: ``"head": "scalar"`` in ``params.json``) has ``v_head`` instead
of ``output``; it maps to ``score`` of the family's ``...ForSequenceClassification`` (:data:`SCORE_KEYS`).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from rlhf.errors import CheckpointError, ConfigError
from rlhf.models.model_types import FAMILY_MODEL_TYPES, family_of
from rlhf.tp.model import ModelArgs

KeyMap = dict[str, tuple[str, ...]]

_ATTN = "model.layers.{i}.self_attn"
LLAMA_KEYS: KeyMap = {
    "model.embed_tokens.weight": ("tok_embeddings.weight",),
    "model.norm.weight": ("norm.weight",),
    "lm_head.weight": ("output.weight",),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight",),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight",),
    **{f"{_ATTN}.{p}_proj.weight": (f"layers.{{i}}.attention.w{p}.weight",) for p in "qkvo"},
    **{f"{_ATTN}.{p}_proj.bias": (f"layers.{{i}}.attention.w{p}.bias",) for p in "qkvo"},
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w1.weight",),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight",),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w3.weight",),
}
_DENSE_MLP = ("mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")
MIXTRAL_KEYS: KeyMap = {
    **{k: v for k, v in LLAMA_KEYS.items() if not any(m in k for m in _DENSE_MLP)},
    "model.layers.{i}.block_sparse_moe.gate.weight": ("layers.{i}.feed_forward.gate.weight",),
    **{
        f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight": (
            f"layers.{{i}}.feed_forward.experts.{{e}}.{w}.weight",
        )
        for w in ("w1", "w2", "w3")
    },
}
# transformers 5 fuses a Mixtral's experts when it loads one (the "mixtral" entry of its conversion_mapping.py),
# so a model in memory (a base with an adapter merged in) has other keys than its files: ``mlp.gate`` is the
# router ``block_sparse_moe.gate``; ``mlp.experts.gate_up_proj`` [E, 2 * I, H] stacks each expert's w1 (gate,
# the first I rows) on its w3 (up, the last I rows); ``mlp.experts.down_proj`` [E, H, I] holds each w2.
# :func:`file_layout_state` undoes it, as ``save_pretrained`` does when it writes the files.
FUSED_MIXTRAL = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$"
)
# The original Qwen (remote code): fused c_attn; mlp.c_proj(mlp.w1(x) * silu(mlp.w2(x))).
QWEN_KEYS: KeyMap = {
    "transformer.wte.weight": ("tok_embeddings.weight",),
    "transformer.ln_f.weight": ("norm.weight",),
    "lm_head.weight": ("output.weight",),
    "transformer.h.{i}.ln_1.weight": ("layers.{i}.attention_norm.weight",),
    "transformer.h.{i}.ln_2.weight": ("layers.{i}.ffn_norm.weight",),
    "transformer.h.{i}.attn.c_attn.weight": tuple(f"layers.{{i}}.attention.w{p}.weight" for p in "qkv"),
    "transformer.h.{i}.attn.c_attn.bias": tuple(f"layers.{{i}}.attention.w{p}.bias" for p in "qkv"),
    "transformer.h.{i}.attn.c_proj.weight": ("layers.{i}.attention.wo.weight",),
    "transformer.h.{i}.mlp.w2.weight": ("layers.{i}.feed_forward.w1.weight",),
    "transformer.h.{i}.mlp.c_proj.weight": ("layers.{i}.feed_forward.w2.weight",),
    "transformer.h.{i}.mlp.w1.weight": ("layers.{i}.feed_forward.w3.weight",),
}
KEY_MAPS: dict[str, KeyMap] = {
    "llama": LLAMA_KEYS,
    "mistral": LLAMA_KEYS,
    "qwen2": LLAMA_KEYS,
    "mixtral": MIXTRAL_KEYS,
    "qwen": QWEN_KEYS,
}
# A verifier's / critic's replicated scalar head (``ScalarHeadTransformer.v_head``) is the ``score`` layer of
# the family's Hugging Face ``...ForSequenceClassification`` with one label; it takes the place of ``lm_head``.
SCORE_KEYS: KeyMap = {"score.weight": ("v_head.weight",)}
HEADS = ("lm", "scalar")
# HF keys that carry no weights of ours (old llama checkpoints store the rotary table).
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

COLUMN_PARALLEL = re.compile(r".*\.(wq|wk|wv)\.(weight|bias)$|.*\.(w1|w3)\.weight$|^output\.weight$")
ROW_PARALLEL = re.compile(r".*\.(wo|w2)\.weight$")
ROUTER = re.compile(r".*\.feed_forward\.gate\.weight$")

# --model_type presets: (dim, n_layers) of the published checkpoints, to catch a preset naming another model.
PRESET_SIZES: dict[str, tuple[int, int]] = {
    "llama-1-7b": (4096, 32),
    "llama-1-13b": (5120, 40),
    "llama-1-33b": (6656, 60),
    "llama-1-65b": (8192, 80),
    "llama-2-7b": (4096, 32),
    "llama-2-13b": (5120, 40),
    "llama-2-70b": (8192, 80),
    "mistral-7b": (4096, 32),
    "mistral-7b-instruct-v0.2": (4096, 32),
    "mixtral-8x7b": (4096, 32),
    "mixtral-8x7b-instruct-v0.1": (4096, 32),
    "qwen-7b": (4096, 32),
    "qwen-14b": (5120, 40),
    "qwen-72b": (8192, 80),
}


def shard_dim(key: str, args: ModelArgs) -> int | None:
    """The dimension a shard key is split along (0 or 1), or None when replicated."""
    if key == "tok_embeddings.weight":
        return 0 if args.tie_word_embeddings else 1
    if ROUTER.match(key):
        return None
    if COLUMN_PARALLEL.match(key):
        return 0
    if ROW_PARALLEL.match(key):
        return 1
    return None


def is_vocab_split(key: str, args: ModelArgs) -> bool:
    """True for tensors split over the (padded) vocabulary: the output layer, tied embeddings."""
    return key == "output.weight" or (key == "tok_embeddings.weight" and args.tie_word_embeddings)


def _expand(template: str, args: ModelArgs) -> list[dict[str, int]]:
    layers = range(args.n_layers) if "{i}" in template else [None]
    experts = range(args.n_experts) if "{e}" in template else [None]
    return [{"i": i, "e": e} for i in layers for e in experts]


def _wanted(hf_template: str, args: ModelArgs) -> bool:
    if hf_template.endswith(".bias"):
        return args.o_bias if ("o_proj" in hf_template or "c_proj" in hf_template) else args.qkv_bias
    if hf_template == "lm_head.weight":
        return not args.tie_word_embeddings
    return True


def concrete_key_map(args: ModelArgs, head: str = "lm") -> dict[str, tuple[str, ...]]:
    """Every HF key this architecture has, mapped to its shard key(s), in checkpoint order.

    ``head="scalar"`` (a verifier or critic shard dir): no ``lm_head``; ``score.weight`` <- ``v_head.weight``.
    """
    if head not in HEADS:
        raise CheckpointError(f"unknown model head {head!r} (expected one of {', '.join(HEADS)})")
    table = {}
    for hf_template, ours in KEY_MAPS[args.family].items():
        if not _wanted(hf_template, args) or (head == "scalar" and hf_template == "lm_head.weight"):
            continue
        for names in _expand(hf_template, args):
            table[hf_template.format(**names)] = tuple(o.format(**names) for o in ours)
    if head == "scalar":
        table.update(SCORE_KEYS)
    return table


def file_layout_state(state: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """An HF model's in-memory state dict under the keys of its files (what :data:`KEY_MAPS` knows).

    Only a Mixtral differs (:data:`FUSED_MIXTRAL`): its fused expert tensors become per-expert views. Their
    shapes are checked against ``args``, so a transformers release that fuses them another way is refused
    instead of loading the experts' halves or transposes as the wrong weights.
    """
    if args.family != "mixtral":
        return state
    expected = {
        "experts.gate_up_proj": (args.n_experts, 2 * args.hidden_dim, args.dim),
        "experts.down_proj": (args.n_experts, args.dim, args.hidden_dim),
    }
    out = {}
    for key, tensor in state.items():
        match = FUSED_MIXTRAL.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, part = f"model.layers.{match[1]}.block_sparse_moe", match[2]
        if part == "gate.weight":
            out[f"{prefix}.gate.weight"] = tensor
            continue
        if tuple(tensor.shape) != expected[part]:
            raise CheckpointError(
                f"{key}: shape {tuple(tensor.shape)}, expected {expected[part]} (experts, out, in): this "
                "transformers version fuses a Mixtral's experts in a layout the TP loader does not know"
            )
        for e, expert in enumerate(tensor):
            if part == "experts.down_proj":
                out[f"{prefix}.experts.{e}.w2.weight"] = expert
            else:
                w1, w3 = expert.chunk(2, dim=0)
                out[f"{prefix}.experts.{e}.w1.weight"], out[f"{prefix}.experts.{e}.w3.weight"] = w1, w3
    return out


def sequence_classification_config(hf_config: dict) -> dict:
    """``config.json`` for a merged scalar-head dir: the family's ``...ForSequenceClassification`` with one
    label, which ``AutoModelForSequenceClassification`` loads (its ``score`` is the verifier's head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_type = hf_config.get("model_type")
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    if architecture is None:
        raise CheckpointError(
            f"model_type {model_type!r} has no transformers ForSequenceClassification class, so a verifier "
            "or critic shard dir of it cannot be merged into an HF dir"
        )
    labels = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    return {**hf_config, "architectures": [architecture], "num_labels": 1, **labels}


def _rope(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params = dict(params)
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"RoPE type {kind!r} is not supported by the TP model (default, linear, llama3)"
        )
    return theta, (None if kind == "default" else {**params, "rope_type": kind})


def model_args_from_hf(config: dict) -> ModelArgs:
    """:class:`ModelArgs` from a config.json dict (defaults filled in, e.g. by ``AutoConfig.to_dict()``)."""
    model_type = config.get("model_type")
    families = [f for f, types in FAMILY_MODEL_TYPES.items() if model_type in types]
    if not families:
        supported = ", ".join(t for types in FAMILY_MODEL_TYPES.values() for t in types)
        raise CheckpointError(f"model_type {model_type!r} is not supported by the TP backend ({supported})")
    family = families[0]
    if family == "qwen":
        return ModelArgs(
            family="qwen",
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            head_dim=config.get("kv_channels"),
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"] // 2,
            norm_eps=config.get("layer_norm_epsilon", 1e-6),
            rope_theta=float(config.get("rotary_emb_base", 10000.0)),
            max_seq_len=config.get("seq_length", 8192),
            qkv_bias=True,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    if config.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true checkpoints are not supported by the TP model")
    theta, scaling = _rope(config)
    window, window_layers = None, None
    layer_types = config.get("layer_types")
    if family == "mistral" or (family == "mixtral" and config.get("sliding_window")):
        window = config.get("sliding_window")
    elif family == "qwen2" and config.get("use_sliding_window") and config.get("sliding_window"):
        window = config["sliding_window"]
        if layer_types:
            window_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    return ModelArgs(
        family=family,
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim") or None,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 4096),
        qkv_bias=family == "qwen2" or bool(config.get("attention_bias")),
        o_bias=family == "llama" and bool(config.get("attention_bias")),
        sliding_window=window,
        sliding_window_layers=window_layers,
        n_experts=config.get("num_local_experts", 0) if family == "mixtral" else 0,
        n_experts_per_tok=config.get("num_experts_per_tok", 2),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def check_divisible(args: ModelArgs, n: int) -> None:
    """Every split dimension must divide by the shard count N (the vocabulary is padded instead)."""
    if n < 1:
        raise ConfigError(f"the shard count must be >= 1, got {n}")
    sizes = {
        "attention heads": args.n_heads,
        "key-value heads": args.n_kv_heads,
        "feed-forward width": args.hidden_dim,
        "model dimension": args.dim,
    }
    for name, size in sizes.items():
        if size % n:
            raise ConfigError(f"the model's {name} ({size}) is not divisible by the shard count {n}")


def check_preset(model_type: str | None, args: ModelArgs, where: str) -> None:
    """``--model_type`` (a family or a preset such as ``llama-2-7b``) must describe the checkpoint."""
    if not model_type:
        return
    family = family_of(model_type)
    if family != args.family:
        raise ConfigError(
            f"--model_type {model_type} expects a {family} checkpoint, but {where} is {args.family}"
        )
    preset = PRESET_SIZES.get(model_type.strip().lower())
    if preset is not None and preset != (args.dim, args.n_layers):
        raise ConfigError(
            f"--model_type {model_type} has dim {preset[0]} and {preset[1]} layers, but {where} has dim "
            f"{args.dim} and {args.n_layers} layers (pass the family name, e.g. --model_type {family})"
        )


def params_dict(args: ModelArgs, n_shards: int, hf_config: dict) -> dict:
    """The content of ``params.json``: the architecture, the shard count and the original config.json."""
    return {**asdict(args), "n_shards": n_shards, "hf_config": hf_config}


def model_args_from_params(params: dict) -> ModelArgs:
    fields = ModelArgs.__dataclass_fields__
    return ModelArgs(**{k: v for k, v in params.items() if k in fields})


def is_split_parameter(name: str, args: ModelArgs) -> bool:
    """True when the model parameter ``name`` holds a different slice on each rank (LoRA weights included).

    LoRA: A is split on a row-parallel layer (``wo``, ``w2``), B on a column-parallel one (see ``rlhf.tp.lora``).
    """
    for marker, split_on_row_layer in ((".lora_A.", True), (".lora_B.", False)):
        if marker in name:
            row_layer = ROW_PARALLEL.match(name.split(marker)[0] + ".weight") is not None
            return row_layer == split_on_row_layer
    return shard_dim(name, args) is not None
