"""The tokenization cache's key: the same tokenizer gives the same key wherever it was loaded from and however
it pads; a change in what it encodes gives another (rlhf/data/code_version.py)."""

from __future__ import annotations

import shutil

import datasets

from rlhf.data.code_version import map_fingerprint, tokenizer_fingerprint
from rlhf.models import load_tokenizer


def test_an_identical_tokenizer_keeps_its_key_and_a_changed_one_does_not(tiny_llama, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)  # the RM stage reading the SFT output dir's copy, say
    base = load_tokenizer(str(tiny_llama))
    key = tokenizer_fingerprint(base)
    assert tokenizer_fingerprint(load_tokenizer(str(copy), padding_side="left")) == key
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert tokenizer_fingerprint(load_tokenizer(str(copy))) == key

    templated = load_tokenizer(str(copy))
    templated.chat_template = "{{ messages[0]['content'] }}"
    added = load_tokenizer(str(copy))
    added.add_tokens(["<tool>"])
    eos = load_tokenizer(str(copy))
    eos.eos_token = "<unk>"
    keys = {tokenizer_fingerprint(t) for t in (templated, added, eos)}
    assert key not in keys and len(keys) == 3

    rows = datasets.Dataset.from_dict({"prompt": ["a"], "response": ["b"]})
    assert map_fingerprint(rows, "step", tokenizer=base, block_size=8) == map_fingerprint(
        rows, "step", tokenizer=load_tokenizer(str(copy), padding_side="left"), block_size=8
    )
    assert map_fingerprint(rows, "step", tokenizer=base, block_size=8) != map_fingerprint(
        rows, "step", tokenizer=base, block_size=9
    )
