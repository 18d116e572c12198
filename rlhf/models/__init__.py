"""Model loading: configs, tokenizers, causal LMs and adapters, with ``--model_type`` validation."""

from rlhf.models.loading import (
    adapter_base_path,
    is_adapter_dir,
    load_causal_lm,
    load_config,
    load_tokenizer,
    resolve_dtype,
)
from rlhf.models.model_types import check_model_type, family_of

__all__ = [
    "adapter_base_path",
    "check_model_type",
    "family_of",
    "is_adapter_dir",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "resolve_dtype",
]
