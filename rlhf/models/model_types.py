"""``--model_type`` names: the families we support and the preset names of the reference descriptions.

A preset such as ``llama-2-7b`` names a family (``llama``); sizes always come from the checkpoint's own
config. The HF ``config.model_type`` of a checkpoint must belong to the requested family.
"""

from __future__ import annotations

from rlhf.errors import ConfigError

# family -> HF config.model_type values that belong to it
FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("llama",),
    "mistral": ("mistral",),
    "mixtral": ("mixtral",),
    "qwen2": ("qwen2",),
    "qwen": ("qwen",),  # the original Qwen (remote code, fused c_attn)
}

PRESETS: dict[str, str] = {
    "llama-1-7b": "llama",
    "llama-1-13b": "llama",
    "llama-1-33b": "llama",
    "llama-1-65b": "llama",
    "llama-2-7b": "llama",
    "llama-2-13b": "llama",
    "llama-2-70b": "llama",
    "mistral-7b": "mistral",
    "mistral-7b-instruct-v0.2": "mistral",
    "mixtral-8x7b": "mixtral",
    "mixtral-8x7b-instruct-v0.1": "mixtral",
    "qwen-7b": "qwen",
    "qwen-14b": "qwen",
    "qwen-72b": "qwen",
}


def family_of(model_type: str) -> str:
    """The family of a ``--model_type`` value (a family name or a preset); ConfigError when unknown."""
    name = model_type.strip().lower()
    if name in FAMILY_MODEL_TYPES:
        return name
    if name in PRESETS:
        return PRESETS[name]
    accepted = ", ".join(list(FAMILY_MODEL_TYPES) + list(PRESETS))
    raise ConfigError(f"--model_type {model_type!r} is not supported (accepted: {accepted})")


def check_model_type(requested: str | None, config_model_type: str, where: str) -> str:
    """Validate ``--model_type`` against a checkpoint's ``config.model_type``; return the family.

    With no ``--model_type`` the family is inferred from the config (any HF model type is accepted then).
    """
    if requested is None or requested == "":
        return config_model_type
    family = family_of(requested)
    if config_model_type not in FAMILY_MODEL_TYPES[family]:
        raise ConfigError(
            f"--model_type {requested} expects a {family} checkpoint, but {where} has "
            f'model_type "{config_model_type}"'
        )
    return family
