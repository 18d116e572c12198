"""GSM8K records and answer extraction on tricky strings."""

import pytest

from rlhf.data.gsm8k import answers_match, extract_gsm8k_label, extract_prediction, normalize_number
from rlhf.data.records import parse_gsm8k
from rlhf.errors import DataError


def test_label_after_hashes_with_commas_removed():
    assert extract_gsm8k_label("She pays 2 * 600 = <<2*600=1200>>1200.\n#### 1,200") == "1200"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("So she has $1,234.50 left. #### 1,234.50", "1234.5"),
        ("5 apples + 3 apples = 8 apples", "8"),
        ("#### -7", "-7"),
        ("it is 3.0", "3"),
        ("the answer is .5 of them", ".5"),
        ("no number here", None),
        ("#### \n the answer is 12", "12"),
    ],
)
def test_prediction_extraction(text, expected):
    assert extract_prediction(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### \u22127", "-7"),  # U+2212 MINUS SIGN, as in GSM8K's own solutions
        ("the change is \u22125", "-5"),
        ("20 \u2212 13 = 7", "7"),  # a minus between numbers is no sign of the last one
        ("#### \uff0d3", "-3"),  # fullwidth hyphen-minus
    ],
)
def test_unicode_minus_keeps_its_sign(text, expected):
    assert extract_prediction(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # a model that misses EOS answers, then makes up the next exercise and answers that too
        ("2*500=1000\n#### 1,000\n\nQuestion: Tom has 3 cats. Answer: 3 #### 3", "1000"),
        ("So the answer is 12.\nQuestion: How many legs does a cat have?\nAnswer: 4", "12"),
        ("She has 5 apples left.\n\nQuestion: Tom has 3 cats. How many?\nAnswer: 3", "5"),
        # the first #### with a number on its line is the answer; an empty one falls through
        ("#### 5\nThe next one is #### 8", "5"),
        ("####\n8 apples", "8"),
        ("#### no idea\nsome more text 6", "6"),
    ],
)
def test_a_continuation_after_the_answer_is_ignored(text, expected):
    assert extract_prediction(text) == expected


def test_label_with_unicode_minus():
    assert extract_gsm8k_label("10 \u2212 12 = \u22122\n#### \u22122") == "-2"


def test_numbers_compare_as_numbers():
    assert answers_match("3.0", "3") and answers_match("1200", "1200")
    assert not answers_match("12", "13") and not answers_match(None, "1")


def test_normalize_number_strips_dollars_and_commas():
    assert normalize_number("$1,000") == "1000"


def test_gsm8k_record_without_final_answer_is_an_error():
    with pytest.raises(DataError, match=r'^t\.jsonl:4: field "answer" has no final answer after "####"'):
        parse_gsm8k({"question": "q", "answer": "just text"}, "t.jsonl:4")


def test_gsm8k_record_parses():
    assert parse_gsm8k({"question": "q?", "answer": "1+1=2\n#### 2"}, "f:1")["label"] == "2"
