"""Stage 1, supervised fine-tuning: response-only loss on prompt/response examples, full or LoRA."""

from rlhf.sft.batching import PaddedCollator, packed_collator
from rlhf.sft.examples import tokenize_sft_dataset, tokenize_sft_row
from rlhf.sft.stage import SFTArguments, run_sft

__all__ = [
    "PaddedCollator",
    "SFTArguments",
    "packed_collator",
    "run_sft",
    "tokenize_sft_dataset",
    "tokenize_sft_row",
]
