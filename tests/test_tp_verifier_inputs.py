"""What the verifier reads: whole question + solution + EOS sequences. A row longer than --max_seq_len is
dropped with one counted warning, never cut at the left, where BOS and the question are; none left is one
line naming --max_seq_len. Solutions of one class only are trained on with a warning."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf.errors import DataError

SHORT = {"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"}
LONG = {"question": "What is 3 plus 5? " * 6, "answer": "3+5=8, and 8 is the sum we want\n#### 8"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_factory("llama")))


def sample_rows(question: str, solutions: list[tuple[str, bool]]) -> list[dict]:
    from rlhf.tp.verifier import question_key

    return [{"question": question, "solution": s, "correct": c, "group": question_key(question)}
            for s, c in solutions]  # fmt: skip


def test_rows_longer_than_max_seq_len_are_dropped_whole_with_one_count(tokenizer, caplog):
    from rlhf.tp.verifier import verifier_examples, verifier_ids

    short = sample_rows("Q1: what is 2 plus 2?", [(" 2+2=4\n#### 4", True), (" 2+2=5\n#### 5", False)])
    short += sample_rows("Q2: what is 1 plus 1?", [(" 1+1=3\n#### 3", False)])
    long = sample_rows("Q3: " + "a long question " * 8, [(" 3+5=8\n#### 8", True), (" 3+5=9\n#### 9", False)])
    limit = max(len(verifier_ids(tokenizer, r["question"], r["solution"])) for r in short)
    assert min(len(verifier_ids(tokenizer, r["question"], r["solution"])) for r in long) > limit
    with caplog.at_level(logging.WARNING, logger="rlhf.tp.verifier"):
        train, held_out = verifier_examples(tokenizer, long + short, limit, eval_ratio=0, seed=0)
    assert held_out == []
    assert [e.input_ids for e in train] == [
        verifier_ids(tokenizer, r["question"], r["solution"]) for r in short
    ]
    assert [e.target for e in train] == [1.0, 0.0, 0.0]  # each label stays with its own sequence
    assert all(e.input_ids[0] == tokenizer.bos_token_id for e in train)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"2 of 5 examples longer than --max_seq_len {limit} dropped" in warnings[0]


def test_the_held_out_split_drops_too_and_counts_once(tokenizer, caplog):
    from rlhf.tp.verifier import verifier_examples, verifier_ids

    rows = []
    for q in range(8):
        rows += sample_rows(
            f"Q{q}: " + "long " * (q % 2) * 20, [(f" #### {q}", True), (f" #### {q + 1}", False)]
        )
    limit = max(
        len(verifier_ids(tokenizer, r["question"], r["solution"]))
        for r in rows
        if "long" not in r["question"]
    )
    with caplog.at_level(logging.WARNING, logger="rlhf.tp.verifier"):
        train, held_out = verifier_examples(tokenizer, rows, limit, eval_ratio=0.5, seed=0)
    assert len(train) + len(held_out) == 8 and all(len(e.input_ids) <= limit for e in train + held_out)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    assert "8 of 16 examples longer than --max_seq_len" in caplog.text


def test_no_row_fitting_is_an_error_naming_max_seq_len(tokenizer):
    from rlhf.tp.verifier import verifier_examples

    rows = sample_rows("Q1: what is 2 plus 2?", [(" 2+2=4\n#### 4", True), (" 2+2=5\n#### 5", False)])
    with pytest.raises(DataError, match=r"no training example fits --max_seq_len 8: 2 of 2 are longer"):
        verifier_examples(tokenizer, rows, 8, eval_ratio=0, seed=0)


def test_one_row_is_never_cut(tokenizer):
    """The per-row builder refuses a row that does not fit instead of keeping only its tail."""
    from rlhf.tp.verifier import verifier_example, verifier_ids

    (row,) = sample_rows("Q1: what is 2 plus 2?", [(" 2+2=4\n#### 4", True)])
    whole = verifier_ids(tokenizer, row["question"], row["solution"])
    assert verifier_example(tokenizer, row, len(whole)).input_ids == whole
    with pytest.raises(DataError, match=f"{len(whole)} tokens .* longer than --max_seq_len 16"):
        verifier_example(tokenizer, row, 16)


def test_scored_solutions_are_read_whole(tokenizer, monkeypatch):
    """Best-of-N scores a sample from BOS and its question to the EOS after its final answer, however long
    (it used to keep only the last 4096 tokens)."""
    import torch

    from rlhf.tp import verifier

    seen = []
    monkeypatch.setattr(
        verifier,
        "score_examples",
        lambda model, examples, *a: seen.extend(examples) or torch.zeros(len(examples)),
    )
    solution = " 1+1=2\n" * 800 + "#### 2"
    verifier.score_solutions(None, tokenizer, [("What is 1 plus 1?", solution)], 2)
    (example,) = seen
    assert len(example.input_ids) > 4096
    assert example.input_ids == verifier.verifier_ids(tokenizer, "What is 1 plus 1?", solution)


def test_verifier_train_with_a_too_short_max_seq_len_trains_nothing(tiny_llama, tmp_path, capsys):
    """The reported run: --max_seq_len 16 on GSM8K rows used to train on their last 16 tokens (BOS and
    question gone); now it stops before loading the model, in one line naming --max_seq_len."""
    from rlhf.tp import verifier_train

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (SHORT, LONG) * 4))
    with pytest.raises(SystemExit) as exit_info:
        verifier_train.main(
            ["--ckpt_dir", str(tiny_llama), "--save_dir", str(tmp_path / "v"), "--train_file",
             str(tmp_path / "train.jsonl"), "--max_seq_len", "16", "--max_steps", "1", "--eval_ratio", "0"]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max_seq_len 16" in err and "Traceback" not in err, err
    assert not (tmp_path / "v").exists()


def test_no_training_row_fitting_says_the_ones_that_fit_are_held_out(tokenizer):
    from rlhf.tp.verifier import split_by_question, verifier_examples, verifier_ids

    _, (held,) = split_by_question(
        sample_rows("Q0", [("", True)]) + sample_rows("Q1", [("", True)]), 0.5, seed=0
    )
    rows = []
    for q in ("Q0", "Q1"):  # the held-out question short, the training one long
        text = q + ": what is 2 plus 2?" + ("" if q == held["question"] else " long" * 20)
        rows += sample_rows(text, [(" 2+2=4\n#### 4", True), (" 2+2=5\n#### 5", False)])
    limit = min(len(verifier_ids(tokenizer, r["question"], r["solution"])) for r in rows) + 2
    with pytest.raises(
        DataError, match=r"2 of 4 are longer .* and the 2 that fit are held out \(--eval_ratio\)"
    ):
        verifier_examples(tokenizer, rows, limit, eval_ratio=0.5, seed=0)


def test_solutions_of_one_class_only_are_named_in_a_warning(tmp_path, caplog):
    from rlhf.tp.verifier import read_verifier_rows

    path = tmp_path / "samples.jsonl"
    rows = [
        {"question": "What is 2 plus 2?", "output": f"2+2=4\n#### 4 ({i})", "correct": True} for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        assert len(read_verifier_rows(str(path))) == 3
    assert f"{path}: all 3 solutions are correct" in caplog.text
    caplog.clear()
    path.write_text(json.dumps(SHORT) + "\n")  # GSM8K rows: each answer and a wrong copy of it
    with caplog.at_level(logging.WARNING):
        assert {r["correct"] for r in read_verifier_rows(str(path))} == {True, False}
    assert "solutions are" not in caplog.text
