"""Data: file discovery, record formats, templates and loading through ``datasets``."""

from rlhf.data.loading import load_dataset_dir, load_text_dir, split_dataset, split_rows
from rlhf.data.pretrain import load_pretrain_blocks
from rlhf.data.templates import render_prompt, tokenize_prompt

__all__ = [
    "load_dataset_dir",
    "load_pretrain_blocks",
    "load_text_dir",
    "render_prompt",
    "split_dataset",
    "split_rows",
    "tokenize_prompt",
]
