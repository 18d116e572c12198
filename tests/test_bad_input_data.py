"""Bad input found by review: each case is a one-line error naming the file and line (or the flag), or a
counted drop in the log naming the first row, never a silent loss or a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf.data import load_dataset_dir
from rlhf.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


# --- preference pairs ----------------------------------------------------------------------------


def test_pairs_identical_before_tokenizing_are_dropped_naming_the_first(tmp_path, caplog):
    from rlhf.reward import clean_pairs

    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same "},
            {"prompt": "p", "chosen": "a", "rejected": " "},
        ],
    )
    with caplog.at_level("WARNING"):
        kept = clean_pairs(load_dataset_dir(data, "preference", str(tmp_path / "cache")))
    assert kept["chosen"] == ["a"]
    assert (
        f"dropped 2 of 3 pairs: 1 with chosen == rejected, 1 with an empty response (the first: {data}:2)"
        in (caplog.text)
    )
    write_jsonl(data, [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=f"every pair has chosen == rejected .*the first: {data}:1"):
        clean_pairs(load_dataset_dir(data, "preference", str(tmp_path / "cache2")))


def test_pairs_the_cut_makes_identical_are_dropped_naming_the_first(tmp_path, tokenizer, caplog):
    """Responses that differ only past --block_size become the same tokens: their loss is ln 2 whatever
    the model does, so they are dropped and counted; none left is an error."""
    from rlhf.reward import tokenize_pairs

    shared = "word " * 10
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Rate cats.", "chosen": "Cats are great.", "rejected": "Cats are bad."},
            {"prompt": "Rate cats.", "chosen": shared + "great", "rejected": shared + "bad"},
            {"prompt": "Rate dogs.", "chosen": shared + "good", "rejected": shared + "awful"},
        ],
    )
    rows = load_dataset_dir(data, "preference", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        pairs = tokenize_pairs(rows, tokenizer, max_length=64, max_response=8)
    assert len(pairs) == 1 and pairs[0]["chosen_ids"] != pairs[0]["rejected_ids"]
    assert (
        "dropped 2 of 3 pairs whose chosen and rejected are the same tokens after the cut to --max_length 64 "
        f"/ --block_size 8 (the first: {data}:2)"
    ) in caplog.text
    assert (
        len(tokenize_pairs(rows, tokenizer, max_length=256, max_response=255)) == 3
    )  # a wider cut keeps all
    with pytest.raises(DataError, match=f"same tokens after the cut .*the first: {data}:2\\)"):
        tokenize_pairs(rows.select([1, 2]), tokenizer, max_length=64, max_response=8)


# --- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "after", ['[{"instruction": "x", "output": "y"}]', '{"instruction": "x", "output": "y"}', "x"]
)
def test_content_after_the_json_list_is_an_error_naming_its_line(tmp_path, after):
    """Two lists concatenated, or a list then an object, loaded only the first list, silently."""
    path = tmp_path / "data.json"
    path.write_text(
        '[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}]\n\n' + after
    )
    with pytest.raises(DataError, match=f"^{path}:4: not valid JSON \\(extra data after the list\\)$"):
        load_dataset_dir(path, "sft", str(tmp_path / "cache"))
    path.write_text('[{"instruction": "a", "output": "b"}]\n \t\r\n')  # whitespace after it is fine
    assert len(load_dataset_dir(path, "sft", str(tmp_path / "cache2"))) == 1


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.jsonl.gz"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    import gzip

    record = {"instruction": "a", "output": "b"}
    text = json.dumps([record]) if name.endswith(".json") else json.dumps(record) + "\n"
    data = "\ufeff".encode() + text.encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    rows = load_dataset_dir(path, "sft", str(tmp_path / "cache"))
    assert rows["response"] == ["b"] and rows["where"] == [f"{path}:1"]


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"instruction": "a\\ud800", "output": "b"}',
            'field "instruction" holds an unpaired surrogate (\\ud800)',
        ),
        (
            '{"instruction": "a", "output": "\\udc00b"}',
            'field "output" holds an unpaired surrogate (\\udc00)',
        ),
        (
            '{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "b"}]}',
            'field "messages[0].content" holds an unpaired surrogate (\\ud83d)',
        ),
        (
            '{"instruction": "a", "output": "b", "x\\ud800": 1}',
            'field "x\\ud800" holds an unpaired surrogate in its name',
        ),
    ],
)
def test_an_unpaired_surrogate_is_an_error_naming_file_line_and_field(tmp_path, line, message):
    """``"\\ud800"`` is valid JSON syntax but no text: it failed later, in Arrow, as a traceback."""
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"instruction": "Say hi.", "output": "\\ud83d\\ude00"}\n' + line + "\n"
    )  # a pair is fine
    with pytest.raises(DataError) as info:
        load_dataset_dir(path, "sft", str(tmp_path / "cache"))
    assert str(info.value) == f"{path}:2: {message}, which is not text"
    str(info.value).encode("utf-8")  # printable


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
         ":2: cannot read as UTF-8 text (invalid continuation byte at byte 56)"),
        ("data.jsonl", b'{"instruction": "a", "output": "b", "id": ' + b"7" * 5000 + b"}\n",
         ":1: not valid JSON (Exceeds the limit (4300"),  # Python's wording after this varies by version
        ("data.json", b'[{"instruction": "a", "output": "b"},\n {"id": ' + b"7" * 5000 + b"}]",
         ":2: not valid JSON (Exceeds the limit (4300"),
        ("pairs.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1' + b"0" * 400 + b"}\n",
         ':1: field "margin" is beyond float64, outside float32 range'),
        ("pairs.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1e39}\n',
         ':1: field "margin" is -1e+39, outside float32 range (\u00b13.403e+38)'),
    ],
)  # fmt: skip
def test_unreadable_text_huge_numbers_and_overflowing_margins_name_file_and_line(
    tmp_path, name, content, message
):
    """Each was a traceback (UnicodeDecodeError naming no line, Python's digit-limit ValueError, an
    OverflowError in the finiteness check), or a margin that became inf in the float32 loss."""
    path = tmp_path / name
    path.write_bytes(content)
    kind = "preference" if name.startswith("pairs") else "sft"
    with pytest.raises(DataError) as info:
        load_dataset_dir(path, kind, str(tmp_path / "cache"))
    assert str(info.value).startswith(f"{path}{message}"), str(info.value)


def test_a_corrupt_gzip_stream_is_one_line_naming_the_file(tmp_path):
    import gzip

    data = bytearray(gzip.compress(b'{"instruction": "a", "output": "b"}\n' * 50))
    data[10] = 0xFF  # the first deflate block's header: an invalid block type
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{path}: cannot read \\(.*invalid block type"):
        load_dataset_dir(path, "sft", str(tmp_path / "cache"))


# --- conversational preference pairs -------------------------------------------------------------

USER = {"role": "user", "content": "Rate cats."}
GOOD = {"role": "assistant", "content": "Cats are great."}
BAD = {"role": "assistant", "content": "Cats are bad."}


def test_conversational_pairs_with_an_explicit_or_implicit_prompt(tmp_path, tokenizer):
    """TRL's conversational preference format: the prompt goes through the chat template, as SFT's chats."""
    from rlhf.data.records import parse_preference
    from rlhf.data.templates import render_chat_prompt
    from rlhf.reward import tokenize_pairs

    explicit = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": 1}
    implicit = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
    expected = {
        "prompt": "",
        "prompt_messages": [USER],
        "chosen": GOOD["content"],
        "rejected": BAD["content"],
    }
    assert parse_preference(explicit, "f:1") == {**expected, "margin": 1.0}
    assert parse_preference(implicit, "f:1") == {**expected, "margin": 0.0}
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt and the chosen conversation as "messages" beside
    ultrafeedback = {"prompt": USER["content"], "messages": [USER, GOOD], **implicit}
    assert parse_preference(ultrafeedback, "f:1") == {**expected, "margin": 0.0}
    data = write_jsonl(tmp_path / "pairs.jsonl", [explicit, implicit])
    pairs = tokenize_pairs(load_dataset_dir(data, "preference", str(tmp_path / "cache")), tokenizer, 64, 32)
    prompt_ids = tokenizer(render_chat_prompt([USER], tokenizer))["input_ids"]
    response_ids = tokenizer(GOOD["content"], add_special_tokens=False)["input_ids"]
    assert (
        pairs[0]["chosen_ids"]
        == pairs[1]["chosen_ids"]
        == prompt_ids + response_ids + [tokenizer.eos_token_id]
    )


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"messages": [USER], "chosen": "a", "rejected": "b"},
            'f:2: a preference row has no "messages" field; give the conversation as "prompt": [messages] and '
            'each response as a list of one assistant message (accepted: {"instruction", "input"?, "chosen", '
            '"rejected"} or {"prompt", "chosen", "rejected"} with string responses; Anthropic-HH',
        ),
        ({"chosen": "Human: a", "rejected": "Robot: b"}, "f:2: \"chosen\" and \"rejected\" share no prefix ending in "
         '"\\n\\nAssistant:" (a pair without "prompt" or "instruction" must be Anthropic-HH transcripts; accepted:'),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": "b"}, 'f:2: field "rejected" must be a list of messages'),
        ({"prompt": "P", "chosen": [GOOD], "rejected": [BAD]}, 'f:2: a string "prompt" beside conversations is read'),
        ({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]},
         'f:2: field "chosen" must hold one message, of role "assistant" (the response to "prompt"), got roles user, '
         "assistant"),
        ({"prompt": [USER], "chosen": [GOOD]}, 'f:2: missing field "rejected"'),
        ({"chosen": [USER, GOOD], "rejected": [USER]}, 'f:2: the last message of "chosen" and of "rejected" must'),
        ({"chosen": [GOOD], "rejected": [BAD]}, 'f:2: "chosen" and "rejected" must be the same conversation'),
        ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "x"}, BAD]},
         'f:2: "chosen" and "rejected" must be the same conversation'),
        ({"chosen": [{"role": "robot", "content": "x"}, GOOD], "rejected": [USER, BAD]},
         'f:2: chosen[0] has role "robot"'),
    ],
)  # fmt: skip
def test_malformed_conversational_pairs_say_what_is_accepted(record, message):
    """``{"messages", "chosen", "rejected"}`` was told about a missing "\\n\\nAssistant:" prefix."""
    from rlhf.data.records import parse_preference

    with pytest.raises(DataError) as info:
        parse_preference(record, "f:2")
    assert str(info.value).startswith(message)


# --- sequences longer than the model's context ---------------------------------------------------


def test_sft_examples_longer_than_the_models_context_are_one_warning(tmp_path, tokenizer, caplog):
    """--block_size 4096 on a model of 512 positions was accepted silently; RoPE models run there, but on
    positions they never trained on."""
    from rlhf.sft.examples import tokenize_sft_dataset

    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Talk.", "output": "cats are great " * 200},
        ],
    )
    rows = load_dataset_dir(data, "sft", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        tokenize_sft_dataset(rows, tokenizer, 4096)  # the tiny llama: max_position_embeddings 512
    warnings = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "(--block_size 4096), more than the model's max_position_embeddings 512" in (warnings[0])
    )
    assert warnings[0].endswith("lower --block_size to 512")
    caplog.clear()
    with caplog.at_level("WARNING"):
        tokenize_sft_dataset(rows, tokenizer, 512)  # cut to fit: nothing to say
        tokenize_sft_dataset(rows, tokenizer, 4096, context_length=8192)
        tokenize_sft_dataset(rows.select([0]), tokenizer, 4096)  # the flag allows more, no example is longer
    assert "max_position_embeddings" not in caplog.text


def test_reward_sides_longer_than_the_models_context_are_one_warning(tmp_path, tokenizer, caplog):
    from transformers import TrainingArguments

    from rlhf.args import DataArguments
    from rlhf.reward.stage import RewardArguments, build_reward_data

    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "Rate cats.", "chosen": "cats are great " * 200, "rejected": "No."}] * 2,
    )
    data_args = DataArguments(
        dataset_dir=str(data), split_ratio=0, block_size=4096, data_cache_dir=str(tmp_path)
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    with caplog.at_level("WARNING"):
        build_reward_data(data_args, RewardArguments(max_length=4096), tokenizer, args)
    assert "(--max_length 4096), more than the model's max_position_embeddings 512" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_reward_data(data_args, RewardArguments(max_length=512), tokenizer, args)
    assert "max_position_embeddings" not in caplog.text


def test_the_reward_models_held_out_pairs_do_not_depend_on_the_length_flags(tmp_path, tokenizer, caplog):
    """A pair the cut makes identical is dropped after the split: an eval-only run with other length flags
    than training's still scores the same held-out rows."""
    from transformers import TrainingArguments

    from rlhf.args import DataArguments
    from rlhf.reward.stage import RewardArguments, build_reward_data

    shared = "word " * 10
    rows = [{"prompt": f"Rate {i}.", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(15)]
    rows += [
        {"prompt": f"Rate {i}.", "chosen": shared + "good", "rejected": shared + "bad"} for i in range(15, 20)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", seed=42)

    def held_out(block_size: int) -> list:
        data_args = DataArguments(
            dataset_dir=str(data), split_ratio=0.2, block_size=block_size, data_cache_dir=str(tmp_path)
        )
        _, pairs = build_reward_data(data_args, RewardArguments(max_length=64), tokenizer, args)
        return [re.search(r"Rate \d+\.", tokenizer.decode(ids)).group() for ids in pairs["chosen_ids"]]

    wide = held_out(64)
    with caplog.at_level("WARNING"):
        narrow = held_out(4)
    assert len(wide) == 4 and 0 < len(narrow) < 4
    assert set(narrow) < set(wide)  # the same rows, less the ones the cut made equal
    assert "held-out pairs whose chosen and rejected are the same tokens" in caplog.text


def test_model_context_length_of_a_model_dir_an_adapter_dir_and_nothing(tmp_path, tiny_llama):
    from rlhf.models.loading import model_context_length

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))
    assert model_context_length(str(tiny_llama)) == model_context_length(str(adapter)) == 512
    assert model_context_length(str(tmp_path)) is None and model_context_length("org/hub-id") is None
    assert model_context_length(None) is None
