"""Data parsing: every record format, and every malformed case with a file:line message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from rlhf.data import load_dataset_dir, load_pretrain_blocks, split_dataset
from rlhf.data.files import find_data_files, iter_json_records
from rlhf.data.records import parse_preference, parse_prompt, parse_sft, split_hh_transcripts
from rlhf.data.templates import ALPACA_PROMPT, alpaca_prompt, render_prompt, tokenize_prompt
from rlhf.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- SFT formats ---------------------------------------------------------------------------------


def test_sft_alpaca_uses_documented_template():
    row = parse_sft({"instruction": "Say hi.", "output": "hi"}, "f:1")
    assert row["prompt"] == ALPACA_PROMPT.format(instruction="Say hi.")
    assert row["response"] == "hi" and row["prompt_messages"] == []


def test_sft_alpaca_with_input_mentions_the_input():
    row = parse_sft({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "f:1")
    assert "### Input:\n1 and 2" in row["prompt"] and row["prompt"].endswith("### Response:\n")


def test_sft_alpaca_empty_input_is_the_plain_template():
    assert alpaca_prompt("X", "  ") == ALPACA_PROMPT.format(instruction="X")


def test_sft_chat_splits_last_assistant_turn():
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]  # fmt: skip
    row = parse_sft({"messages": messages}, "f:1")
    assert row["response"] == "hello" and row["prompt_messages"] == messages[:2]


def test_sft_prompt_response():
    assert parse_sft({"prompt": "Q:", "response": "A"}, "f:1") == {
        "prompt": "Q:", "prompt_messages": [], "response": "A"}  # fmt: skip


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "x"}, 'f:3: missing field "output"'),
        ({"prompt": "x"}, 'f:3: missing field "response"'),
        ({"instruction": 5, "output": "y"}, 'f:3: field "instruction" must be a string, got int'),
        ({"instruction": "x", "output": None}, 'f:3: field "output" must be a string, got NoneType'),
        ({"output": "y"}, 'f:3: missing field "instruction", "messages" or "prompt"'),
        ({"messages": []}, 'f:3: field "messages" must be a non-empty list'),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            'f:3: the last message must have role "assistant"',
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}]},
            'f:3: "messages" holds no prompt before the assistant turn',
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, 'f:3: messages[0] has role "robot"'),
        ({"messages": [{"role": "user"}]}, 'f:3: messages[0]: missing field "content"'),
        ({"instruction": "x", "input": 3, "output": "y"}, 'f:3: field "input" must be a string'),
    ],
)
def test_sft_malformed_records(record, message):
    with pytest.raises(DataError) as info:
        parse_sft(record, "f:3")
    assert str(info.value).startswith(message)


# --- preference formats --------------------------------------------------------------------------


def test_preference_instruction_format():
    row = parse_preference({"instruction": "Q", "chosen": "good", "rejected": "bad"}, "f:1")
    assert row["prompt"] == alpaca_prompt("Q") and (row["chosen"], row["rejected"]) == ("good", "bad")
    assert row["margin"] == 0.0


def test_preference_prompt_format_with_margin():
    row = parse_preference({"prompt": "P", "chosen": "a", "rejected": "b", "margin": 2}, "f:1")
    assert row["prompt"] == "P" and row["margin"] == 2.0


def test_preference_hh_transcripts_split_at_last_shared_assistant_tag():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Go away."
    row = parse_preference({"chosen": chosen, "rejected": rejected}, "f:1")
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert row["chosen"] == " Fine, thanks." and row["rejected"] == " Go away."
    assert row["prompt"] + row["chosen"] == chosen


def test_hh_split_when_responses_share_a_prefix():
    prompt, chosen, rejected = split_hh_transcripts(
        "\n\nHuman: q\n\nAssistant: I think yes", "\n\nHuman: q\n\nAssistant: I think no", "f:1"
    )
    assert prompt == "\n\nHuman: q\n\nAssistant:" and chosen == " I think yes" and rejected == " I think no"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "P", "chosen": "a"}, 'f:2: missing field "rejected"'),
        ({"prompt": "P", "rejected": "a"}, 'f:2: missing field "chosen"'),
        (
            {"prompt": "P", "chosen": ["a"], "rejected": "b"},
            'f:2: field "rejected" must be a list of messages like the other side',
        ),
        (
            {"prompt": "P", "chosen": "a", "rejected": "b", "margin": "x"},
            'f:2: field "margin" must be a number',
        ),
        ({"chosen": "Human: a", "rejected": "Robot: b"}, 'f:2: "chosen" and "rejected" share no prefix'),
    ],
)
def test_preference_malformed_records(record, message):
    with pytest.raises(DataError) as info:
        parse_preference(record, "f:2")
    assert str(info.value).startswith(message)


# --- PPO prompts ---------------------------------------------------------------------------------


def test_prompt_from_sft_records():
    assert parse_prompt({"instruction": "Q", "output": "A"}, "f:1")["prompt"] == alpaca_prompt("Q")
    assert parse_prompt({"prompt": "P"}, "f:1") == {"prompt": "P", "prompt_messages": []}
    chat = parse_prompt(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "f:1"
    )
    assert chat["prompt_messages"] == [{"role": "user", "content": "u"}]


def test_prompt_record_without_prompt_is_an_error():
    with pytest.raises(DataError, match=r'^f:1: missing field "instruction", "messages" or "prompt"'):
        parse_prompt({"question": "x"}, "f:1")


# --- files and directories -----------------------------------------------------------------------


def test_directory_reads_json_jsonl_and_gz(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p1", "response": "r1"}]))
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p2", "response": "r2"}])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"prompt": "p3", "response": "r3"}) + "\n")
    (tmp_path / "cache").mkdir()  # sub-directories (the data cache) are skipped
    dataset = load_dataset_dir(tmp_path, "sft", cache_dir=str(tmp_path / "cache"))
    assert sorted(dataset["prompt"]) == ["p1", "p2", "p3"]


def test_json_list_errors_name_the_line_of_the_item(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c"}\n]\n')
    with pytest.raises(DataError, match=r'list\.json:3: missing field "response"'):
        load_dataset_dir(path, "sft")


def test_every_item_of_a_long_json_list_gets_its_own_first_line(tmp_path, monkeypatch):
    """Counted on from the item before, so the file is scanned for newlines once: each count used to start at
    the top of the file (20k items took 93 s)."""
    import rlhf.data.files as files

    class ScanCountingText(str):
        scanned = 0

        def count(self, sub, start=0, end=None):
            end = len(self) if end is None else end
            ScanCountingText.scanned += max(0, end - start)
            return super().count(sub, start, end)

    read_text = files.read_text
    monkeypatch.setattr(files, "read_text", lambda p: ScanCountingText(read_text(p)))
    rows = [{"prompt": f"p{i}\nsecond line", "response": "r"} for i in range(3000)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows, indent=1))  # "[", then 4 lines per item
    wheres = [where for where, _ in iter_json_records(path)]
    assert wheres == [f"{path}:{2 + 4 * i}" for i in range(3000)]
    assert ScanCountingText.scanned <= len(path.read_text())  # once over the file, not once per item


def test_json_lines_and_text_are_read_a_line_at_a_time_with_universal_newlines(tmp_path, monkeypatch):
    """Never the whole file in memory (a 125 MB JSONL with one emoji per row held 990 MB as one string);
    a byte-order mark, "\r\n" and a lone "\r" read as text mode reads them, lines numbered alike."""
    import gzip

    import rlhf.data.files as files
    from rlhf.data.loading import load_text_dir

    monkeypatch.setattr(files, "read_text", lambda path: pytest.fail(f"{path} read whole"))
    body = (
        '\ufeff{"prompt": "a", "response": "b"}\r\n\r{"prompt": "c\u2028d", "response": "e"}\r{"prompt": "f"}'
    )
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(body.encode()))
    records = list(iter_json_records(path))
    assert [(where, r["prompt"]) for where, r in records] == [
        (f"{path}:1", "a"), (f"{path}:3", "c\u2028d"), (f"{path}:4", "f")
    ]  # fmt: skip
    with pytest.raises(DataError, match=r'd\.jsonl\.gz:4: missing field "response"'):
        load_dataset_dir(path, "sft")
    text = tmp_path / "t" / "a.txt"
    text.parent.mkdir()
    text.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree")
    rows = [r["text"] for r in load_text_dir(str(text.parent), str(tmp_path / "cache"))]
    assert "".join(rows) == "one\ntwo\nthree"


@pytest.mark.parametrize("read_bytes", [1, 5, 7, 64, 1 << 22])
def test_text_lines_are_whole_across_read_blocks(tmp_path, monkeypatch, read_bytes):
    """Blocks cut anywhere: inside a UTF-8 character, between "\r" and "\n", in a line longer than a block;
    the lines are those of text mode's universal newlines, and a UTF-8 error names its line and byte."""
    import rlhf.data.files as files

    monkeypatch.setattr(files, "READ_BYTES", read_bytes)
    text = "\ufeffé🙂 one\r\ntwo\rthree\n\n" + "long " * 40 + "\u2028still\r\nlast"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        expected = handle.read().split("\n")
    lines = [(n, line) for n, line in files.iter_text_lines(path)]
    assert [n for n, _ in lines] == list(range(1, len(expected) + 1))
    assert "".join(line for _, line in lines) == "\n".join(expected)
    path.write_bytes(b"ok\nfine\nbad \xff here\n")
    with pytest.raises(
        DataError, match=r"t\.txt:3: cannot read as UTF-8 text \(invalid start byte at byte 12\)"
    ):
        list(files.iter_text_lines(path))


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match=r"obj\.json:1: a \.json data file must hold a JSON list"):
        list(iter_json_records(path))


def test_invalid_json_line_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset_dir(tmp_path, "sft")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path, newline):
    """U+2028, U+2029 and U+0085 are valid unescaped in JSON strings (``ensure_ascii=False`` writes them)."""
    texts = ["one\u2028two", "three\u2029four", "blue\x85"]
    lines = [json.dumps({"prompt": t, "response": t}, ensure_ascii=False) for t in texts] + [
        '{"prompt": "p"}'
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    records = list(iter_json_records(path))[:3]
    assert [r["prompt"] for _, r in records] == texts
    assert [where for where, _ in records] == [f"{path}:{i}" for i in (1, 2, 3)]
    with pytest.raises(DataError, match=r'd\.jsonl:4: missing field "response"'):
        load_dataset_dir(path, "sft")


def test_missing_field_through_the_loader_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                           {"prompt": "p", "chosen": "a"}])  # fmt: skip
    with pytest.raises(DataError) as info:
        load_dataset_dir(tmp_path, "preference")
    assert str(info.value) == f'{tmp_path / "pairs.jsonl"}:2: missing field "rejected"'


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_margin_names_file_line_and_field(tmp_path, literal):
    rows = ['{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}',
            '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + literal + "}"]  # fmt: skip
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_dataset_dir(tmp_path, "preference")
    number = {"NaN": "nan", "-Infinity": "-inf"}.get(literal, "inf")
    assert str(info.value) == (
        f'{tmp_path / "pairs.jsonl"}:2: field "margin" is {number} (numbers in data must be finite)'
    )


def test_non_finite_number_anywhere_in_any_format_is_rejected(tmp_path):
    messages = [{"role": "user", "content": "hi", "score": 1.0},
                {"role": "assistant", "content": "yo", "score": float("nan")}]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text("[\n" + json.dumps({"prompt": "p", "response": "r"}) + ",\n"
                    + json.dumps({"messages": messages}) + "\n]\n")  # fmt: skip
    for kind in ("sft", "prompt"):
        with pytest.raises(DataError, match=r'chat\.json:3: field "messages\[1\]\.score" is nan'):
            load_dataset_dir(path, kind)
    with pytest.raises(DataError, match=r'f:1: field "margin" is inf'):
        parse_preference({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "f:1")


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected a JSON object, got list"):
        list(iter_json_records(path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_dataset_dir(tmp_path, "sft")


def test_empty_json_list(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError, match=r"e\.json: empty file"):
        load_dataset_dir(tmp_path, "sft")


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        find_data_files(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        find_data_files(tmp_path / "nope")


def test_unknown_extension(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"notes\.csv: unknown extension"):
        load_dataset_dir(tmp_path, "sft")


def test_shipped_sample_data_parses(repo_root):
    assert len(load_dataset_dir(repo_root / "sft_data", "sft")) >= 200
    assert len(load_dataset_dir(repo_root / "rm_data", "preference")) >= 200
    assert len(load_dataset_dir(repo_root / "sft_data", "prompt")) >= 200


def test_split_ratio_holds_out_at_least_one_row(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(20)])
    train, held_out = split_dataset(load_dataset_dir(tmp_path, "sft"), 0.01, seed=1)
    assert len(held_out) == 1 and len(train) == 19
    assert not set(train["prompt"]) & set(held_out["prompt"])


def test_split_ratio_that_rounds_to_every_row_keeps_one_training_row(tmp_path, caplog):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(3)])
    with caplog.at_level("WARNING"):
        train, held_out = split_dataset(load_dataset_dir(tmp_path, "sft"), 0.9, seed=1)
    assert len(train) == 1 and len(held_out) == 2
    assert "--split_ratio 0.9 of 3 rows leaves none to train on" in caplog.text


def test_cache_dir_is_used_and_refreshed_when_a_file_changes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert len(load_dataset_dir(data, "sft", cache_dir=str(cache))) == 1
    assert any(cache.rglob("*.arrow"))
    write_jsonl(data / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert len(load_dataset_dir(data, "sft", cache_dir=str(cache))) == 2


# --- templates with a real tokenizer ---------------------------------------------------------------


def test_chat_prompt_rendered_with_the_tokenizer_template(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"prompt": "", "prompt_messages": [{"role": "user", "content": "hi"}]}
    assert render_prompt(row, tokenizer) == "<|user|>\nhi\n<|assistant|>\n"
    ids = tokenize_prompt(row, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


STRICT_TEMPLATE = (  # as Llama-2 / Mistral-Instruct templates: roles must alternate
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_chat_template_that_rejects_a_row_is_one_line_naming_file_and_line(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from rlhf.sft.examples import tokenize_sft_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = STRICT_TEMPLATE
    turn = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [turn, answer]}, {"messages": [turn, turn, answer]}])
    rows = load_dataset_dir(tmp_path, "sft")
    assert rows[0]["where"] == f"{(tmp_path / 'chat.jsonl').resolve()}:1"
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(rows, tokenizer, 64)
    message = str(info.value)
    assert message.startswith(
        f"{(tmp_path / 'chat.jsonl').resolve()}:2: the tokenizer's chat template rejects"
    )
    assert "(roles user, user): Conversation roles must alternate" in message and "\n" not in message


def test_pretraining_text_grouped_into_blocks(repo_root, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    blocks = load_pretrain_blocks(str(repo_root / "pt_data"), tokenizer, block_size=64)
    assert blocks.dtype == torch.int32 and blocks.shape[0] > 50 and blocks.shape[1] == 64  # as cached
    assert tokenizer.eos_token_id in blocks[:2].flatten().tolist()


def test_pretraining_text_read_in_rows_gives_the_blocks_of_the_whole_stream(
    tmp_path, tiny_llama, monkeypatch
):
    """Large files are read in rows of whole lines and tokenized a few rows at a time (memory); the blocks
    are those of every document of every file concatenated in order and cut, the remainder dropped."""
    from transformers import AutoTokenizer

    import rlhf.data.loading as loading
    from rlhf.data.templates import without_appended_eos

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    lines = [f"line {i} " + "word " * (i % 7) for i in range(400)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:250]) + "\n\n")
    (tmp_path / "b.txt").write_text("x" * 700 + "\n" + "\n".join(lines[250:]))  # a line longer than a row
    monkeypatch.setattr(loading, "TEXT_ROW_CHARS", 300)
    rows = [r["text"] for r in loading.load_text_dir(str(tmp_path), str(tmp_path / "cache"))]
    assert len(rows) > 20 and all(r.endswith("\n") for r in rows[:-1])
    assert "".join(rows) == (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    blocks = load_pretrain_blocks(str(tmp_path), tokenizer, 16, str(tmp_path / "cache"))
    docs = lines[:250] + ["x" * 700] + lines[250:]
    stream = [t for seq, doc in zip(tokenizer(docs)["input_ids"], docs)
              for t in without_appended_eos(seq, doc, tokenizer) + [tokenizer.eos_token_id]]  # fmt: skip
    usable = len(stream) - len(stream) % 16
    assert blocks.tolist() == [stream[i : i + 16] for i in range(0, usable, 16)]


@pytest.fixture
def eos_appending_tokenizer(tiny_llama):
    """The tiny llama's tokenizer as a Llama tokenizer saved with ``add_eos_token=True``: every encoding
    ends in EOS."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    assert tokenizer("hi")["input_ids"][-1] == tokenizer.eos_token_id
    return tokenizer


def test_a_tokenizer_that_appends_eos_gives_no_eos_inside_an_example(eos_appending_tokenizer, tmp_path):
    """A Llama tokenizer saved with ``add_eos_token=True`` appends EOS to every encoding: a prompt ended in
    one (the model learned to stop before answering), a pretraining document in two."""
    from rlhf.sft.examples import tokenize_sft_row

    tokenizer = eos_appending_tokenizer
    eos_id = tokenizer.eos_token_id
    example = tokenize_sft_row({"prompt": "Say hi", "prompt_messages": [], "response": "hi"}, tokenizer, 64)
    assert example["input_ids"].count(eos_id) == 1 and example["input_ids"][-1] == eos_id
    (tmp_path / "a.txt").write_text("hello there\ngeneral text\n" * 20)
    blocks = load_pretrain_blocks(str(tmp_path), tokenizer, block_size=8)
    flat = blocks.flatten().tolist()
    assert eos_id in flat and all(a != eos_id or b != eos_id for a, b in zip(flat, flat[1:]))


def test_prompts_of_ppo_and_the_tp_stages_end_without_the_appended_eos(
    eos_appending_tokenizer, gsm8k_file, tmp_path
):
    """``rlhf.tp.ppo_train`` tokenized its rollout prompts with the tokenizer's own EOS at the end, unlike
    ``solver_train`` and the verifier (and the PEFT PPO stage): every rollout continued a prompt ending in
    ``</s>``."""
    from rlhf.ppo.data import load_prompts
    from rlhf.tp.ppo_factory import gsm8k_prompts
    from rlhf.tp.solver_train import solver_example
    from rlhf.tp.verifier import verifier_ids

    tokenizer = eos_appending_tokenizer
    eos_id = tokenizer.eos_token_id
    prompts, labels = gsm8k_prompts(str(gsm8k_file), tokenizer, 256)
    question = json.loads(gsm8k_file.read_text().splitlines()[0])["question"]
    solver = solver_example(question, "2+2=4\n#### 4", tokenizer, 256)
    n_prompt = solver.labels.count(-100)
    assert prompts.ids[0] == solver.input_ids[:n_prompt] == verifier_ids(tokenizer, question, "4")[:n_prompt]
    assert all(eos_id not in ids for ids in prompts.ids) and labels[prompts.texts[0]] == "4"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": question}) + "\n")
    peft_prompts = load_prompts(str(tmp_path), tokenizer, 256, None)
    assert all(ids[-1] != eos_id for ids in peft_prompts.ids)


def test_pretraining_dir_without_txt_is_an_error(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="unknown extension"):
        load_pretrain_blocks(str(tmp_path), AutoTokenizer.from_pretrained(tiny_llama), 8)
