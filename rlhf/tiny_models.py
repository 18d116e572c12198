"""Tiny random-init models with a locally trained tokenizer, for tests and the demo.

``python -m rlhf.tiny_models --arch llama --out DIR`` writes a Hugging Face model directory (``config.json`` +
``model.safetensors`` + tokenizer files) that ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load with no network. The tokenizer is a byte-level BPE trained on
the repository's sample data (``sft_data/``, ``rm_data/``, ``pt_data/``) plus the prompt templates, with
``<pad>``/``<s>``/``</s>``/``<unk>`` tokens, a BOS added to every encoding, and a small chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from rlhf import toy_task
from rlhf.data.files import JSON_EXTENSIONS, TEXT_EXTENSIONS, iter_json_records, read_text
from rlhf.data.templates import ALPACA_PROMPT_WITH_INPUT
from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "mixtral", "qwen2")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA_DIRS = ("sft_data", "rm_data", "pt_data")


def _corpus(data_root: Path) -> Iterator[str]:
    """Text to train the tokenizer on: the sample data when present, else the toy task's sentences."""
    yield ALPACA_PROMPT_WITH_INPUT
    yield "<|system|>\n<|user|>\n<|assistant|>\n #### 0123456789 + - * / = $ % , . ? !"
    found = False
    for name in SAMPLE_DATA_DIRS:
        folder = data_root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(TEXT_EXTENSIONS):
                found = True
                yield from read_text(path).splitlines()
            elif path.name.endswith(JSON_EXTENSIONS):
                found = True
                for _, record in iter_json_records(path):
                    yield json.dumps(record, ensure_ascii=False)
    if not found:
        yield from toy_task.POSITIVE + toy_task.NEGATIVE + toy_task.QUESTIONS + toy_task.TOPICS


def build_tokenizer(vocab_size: int = 512, data_root: Path = REPO_ROOT) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the sample data and wrap it as a transformers fast tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(data_root), trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
) -> PretrainedConfig:
    """A small config of the given family (GQA: ``num_kv_heads`` < ``num_heads``)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 11 // 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=256)
    if arch == "mixtral":
        common["intermediate_size"] = hidden_size * 3 // 2
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def build_tiny_model(
    arch: str,
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    data_root: Path = REPO_ROOT,
) -> Path:
    """Write a random-init model of family ``arch`` and its tokenizer to ``out``; return ``out``."""
    out = Path(out)
    tokenizer = build_tokenizer(vocab_size, data_root)
    ids = tokenizer("I love cats.")["input_ids"]
    if len(ids) < 3 or ids[0] != BOS_ID:  # a silent conversion failure yields empty ids
        raise RuntimeError(f"the trained tokenizer does not encode: {ids}")
    config = tiny_config(
        arch, len(tokenizer), hidden_size, num_layers, num_heads, num_kv_heads, tie_word_embeddings
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote tiny %s model (%d parameters) to %s", arch, n_params, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-init HF model with a local tokenizer.")
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--tie_word_embeddings", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_tiny_model(
        args.arch,
        args.out,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    config = AutoConfig.from_pretrained(out)
    print(f"{out}: {config.model_type}, vocab {config.vocab_size}, hidden {config.hidden_size}")


if __name__ == "__main__":
    main()
