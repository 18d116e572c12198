"""SFT data path: prompt masking, EOS, truncation, padding and packing isolation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.sequences import fit_to_length
from rlhf.sft import PaddedCollator, packed_collator, tokenize_sft_row
from rlhf.sft.examples import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_fit_to_length_cuts_prompt_from_left_and_keeps_bos():
    prompt, response, cut = fit_to_length([1, 10, 11, 12, 13], [20, 21, 2], max_length=5, bos_id=1)
    assert (prompt, response, cut) == ([1, 13], [20, 21, 2], True)
    assert fit_to_length([1, 10], [20, 2], max_length=8, bos_id=1) == ([1, 10], [20, 2], False)


def test_fit_to_length_cuts_a_response_longer_than_the_budget_on_the_right():
    prompt, response, cut = fit_to_length([1, 10, 11], list(range(20, 40)), max_length=6, bos_id=1)
    assert response == [20, 21, 22, 23] and prompt == [1, 11] and cut  # the cut prompt keeps its BOS
    prompt, response, _ = fit_to_length([10, 11], list(range(20, 40)), max_length=6, bos_id=1)
    assert response == [20, 21, 22, 23, 24] and prompt == [11]  # no BOS to keep: one prompt token
    prompt, response, _ = fit_to_length([1, 10, 11], list(range(20, 40)), 10, max_response=4, bos_id=1)
    assert response == [20, 21, 22, 23] and prompt == [1, 10, 11]


def test_prompt_is_masked_and_eos_is_learned(tokenizer):
    row = {"prompt": "Tell me how you feel about cats.\n", "prompt_messages": [], "response": "I love cats."}
    ex = tokenize_sft_row(row, tokenizer, block_size=128)
    n_prompt = len(tokenizer(row["prompt"])["input_ids"])
    assert ex["input_ids"][0] == tokenizer.bos_token_id
    assert ex["input_ids"].count(tokenizer.bos_token_id) == 1
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == ex["labels"][-1] == tokenizer.eos_token_id
    assert not ex["truncated"]


def test_eos_is_learned_when_the_pad_token_is_eos(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.pad_token = tokenizer.eos_token
    row = {"prompt": "Hi\n", "prompt_messages": [], "response": "I love tea."}
    ex = tokenize_sft_row(row, tokenizer, block_size=64)
    short = tokenize_sft_row({**row, "response": "Yes."}, tokenizer, block_size=64)
    batch = PaddedCollator(tokenizer.pad_token_id)([ex, short])
    n = len(short["input_ids"])
    assert batch["labels"][1, n - 1] == tokenizer.eos_token_id  # the real EOS is a target
    assert batch["attention_mask"][1, n - 1] == 1 and batch["attention_mask"][1, n:].sum() == 0
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()  # padding (same id as EOS) is not


def test_truncated_examples_keep_the_response(tokenizer):
    row = {"prompt": "word " * 60, "prompt_messages": [], "response": "I love cats."}
    ex = tokenize_sft_row(row, tokenizer, block_size=16)
    assert ex["truncated"] and len(ex["input_ids"]) == 16
    assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id


def test_empty_responses_are_dropped_and_counted(tmp_path, tokenizer, caplog):
    """A whitespace or empty response teaches nothing but an EOS: such rows are dropped with a count naming
    the first one's file:line; a file of nothing else is an error."""
    from rlhf.data import load_dataset_dir
    from rlhf.errors import DataError
    from rlhf.sft.examples import tokenize_sft_dataset

    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say hi", "output": "   "}\n'
        '{"instruction": "Say bye", "output": ""}\n'
    )
    with caplog.at_level("WARNING"):
        examples = tokenize_sft_dataset(
            load_dataset_dir(str(data), "sft", str(tmp_path / "cache")), tokenizer, 32
        )
    assert len(examples) == 1
    assert f"dropped 2 of 3 SFT examples with an empty response (the first: {data}:2)" in caplog.text
    data.write_text('{"instruction": "Say bye", "output": " "}\n')
    with pytest.raises(DataError, match=f"every SFT example has an empty response \\(the first: {data}:1\\)"):
        tokenize_sft_dataset(load_dataset_dir(str(data), "sft", str(tmp_path / "cache2")), tokenizer, 32)


def test_a_response_that_spells_a_special_token_is_one_warning_naming_the_first(tmp_path, tokenizer, caplog):
    """``</s>`` written in an answer (HTML strikethrough, a tokenizer tutorial) is read as EOS, as Hugging
    Face tokenizers read it: the model learns to stop there. The data is kept as peers train it, with
    one warning that names the first such row."""
    from rlhf.data import load_dataset_dir
    from rlhf.sft.examples import tokenize_sft_dataset

    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Strike", "output": "Use <s>old</s> tags."}\n'
        '{"instruction": "Say bye", "output": "bye</s>"}\n'
    )
    with caplog.at_level("WARNING"):
        examples = tokenize_sft_dataset(
            load_dataset_dir(str(data), "sft", str(tmp_path / "cache")), tokenizer, 64
        )
    assert len(examples) == 3 and set(examples.column_names) == {"input_ids", "labels"}
    assert (
        f"2 of 3 SFT responses spell a special token of the tokenizer as text (the first: {data}:2)"
        in caplog.text
    )
    assert examples[1]["labels"].count(tokenizer.eos_token_id) == 2  # what the warning is about


def test_chat_rows_use_the_chat_template(tokenizer):
    row = {"prompt": "", "prompt_messages": [{"role": "user", "content": "Hi"}], "response": "Hello."}
    ex = tokenize_sft_row(row, tokenizer, block_size=64)
    text = tokenizer.decode(ex["input_ids"])
    assert "<|user|>" in text and "<|assistant|>" in text and text.endswith("Hello.</s>")


def test_packed_examples_do_not_attend_to_each_other(tiny_llama, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False  # as in training: packed masks are built only without a KV cache
    rows = [
        {"prompt": "Tell me about cats.\n", "prompt_messages": [], "response": "I love cats."},
        {"prompt": "What do you think of rain?\n", "prompt_messages": [], "response": "Rain is sad."},
    ]
    examples = [tokenize_sft_row(r, tokenizer, 64) for r in rows]
    packed = packed_collator("sdpa")(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        offset = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            n = len(ex["input_ids"])
            torch.testing.assert_close(packed_logits[offset : offset + n], alone, atol=1e-4, rtol=1e-4)
            offset += n
    # the first label of every example is masked, so no example is trained to predict the next one
    first = len(examples[0]["input_ids"])
    assert packed["labels"][0, 0] == IGNORE_INDEX and packed["labels"][0, first] == IGNORE_INDEX


def test_a_change_of_the_data_code_is_never_served_from_the_cache(tmp_path, tokenizer, monkeypatch):
    """``datasets`` keys a ``map`` of a module's function by the function's name, not its code: after an
    upgrade the cache in --data_cache_dir handed back rows tokenized by the old code (here: a helper of
    ``tokenize_sft_row`` that now adds a token). The data code's hash is part of the key."""
    from rlhf.data import code_version, load_dataset_dir
    from rlhf.sft import examples

    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say bye", "output": "bye"}\n'
    )
    cache = str(tmp_path / "cache")

    def tokenized() -> list[list[int]]:
        return examples.tokenize_sft_dataset(load_dataset_dir(str(data), "sft", cache), tokenizer, 256)[
            "input_ids"
        ]

    before = tokenized()
    original = examples.encode_response
    monkeypatch.setattr(examples, "encode_response", lambda text, tok: [5] + original(text, tok))
    assert tokenized() == before  # same code version: the cache answers, as datasets keys it
    monkeypatch.setattr(code_version, "data_code_version", lambda: "an upgraded version")
    after = tokenized()
    assert [len(ids) for ids in after] == [len(ids) + 1 for ids in before]


def test_the_cut_and_token_counts_are_logged(tmp_path, tokenizer, caplog):
    from rlhf.data import load_dataset_dir
    from rlhf.sft.examples import tokenize_sft_dataset

    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"instruction": "Say hi", "output": "hi"}\n'
        '{"instruction": "Tell a long story", "output": "' + "once upon a time " * 20 + '"}\n'
    )
    rows = load_dataset_dir(str(data), "sft", str(tmp_path / "cache")).select([1, 0])  # an indices mapping
    with caplog.at_level("INFO"):
        examples = tokenize_sft_dataset(rows, tokenizer, 128)
    lengths = [len(ids) for ids in examples["input_ids"]]
    assert lengths[0] == 128 and lengths[1] < 128
    assert "1 of 2 examples were longer than --block_size 128 and were cut" in caplog.text
    assert f"2 SFT examples, {sum(lengths)} tokens ({sum(lengths) / 2:.1f} per example)" in caplog.text
