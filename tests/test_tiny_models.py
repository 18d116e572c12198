"""The tiny-model factory: four families that load with plain transformers and run a forward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhf.tiny_models import ARCHS, BOS_ID, EOS_ID, PAD_ID


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_and_runs(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch
    assert (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000
    batch = tokenizer(["I love cats.", "Snow is ugly and I hate it."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_really_encodes_and_round_trips(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = "Tell me how you feel about the sea. #### 42"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) > 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
    )


def test_tokenizer_has_a_chat_template(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == "<|user|>\nhi\n<|assistant|>\nyo</s>\n"


def test_the_tokenizer_compresses_the_sample_data(tiny_llama, repo_root):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    sentence = "I really like bicycles, they are great."
    assert len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) < len(sentence) / 2.5


def test_tied_embeddings_variant(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cli_writes_a_model_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.tiny_models", "--arch", "qwen2", "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen2"
