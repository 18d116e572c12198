"""GSM8K: the label after ``####`` and the number a model's solution ends with."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# minus signs other than ASCII "-" (U+2212 MINUS SIGN, small and fullwidth hyphen-minus): GSM8K's own
# solutions use U+2212, and a model trained on them writes it too
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
# a hallucinated next exercise in the prompt's format ("Question: ...\nAnswer:", rlhf/tp/prompt.py)
_NEXT_QUESTION = re.compile(r"\n\s*Question:")


def find_number(text: str) -> re.Match | None:
    """The first number of ``text`` as written (any minus sign counted as ``-``; positions are ``text``'s)."""
    return _NUMBER.search(text.translate(_MINUS))


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``; ``"$7"`` -> ``"7"``; ``"−7"`` (U+2212) -> ``"-7"``; None when ``text``
    holds no number."""
    match = find_number(text.replace("$", ""))
    if match is None:
        return None
    value = match.group(0).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    if value in ("", "-"):
        return None
    if value.startswith("-0") and value.strip("-0.") == "":
        value = "0"
    return value


def extract_gsm8k_label(answer: str) -> str | None:
    """The reference answer of a GSM8K ``answer`` field: the number after the last ``####``."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def extract_prediction(output: str) -> str | None:
    """The number a generated solution commits to.

    Only the text before a hallucinated next exercise counts (a line starting with ``Question:``, the
    prompt's format: a model that missed EOS goes on with a question and answer of its own). In it, in
    order of preference: the number on the line of the first ``####`` that has one (``####`` ends a GSM8K
    solution; a later one belongs to a continuation); after the first "the answer is"; else the last
    number in the text.
    """
    output = _NEXT_QUESTION.split(output.translate(_MINUS), maxsplit=1)[0]
    for tail in output.split("####")[1:]:
        found = normalize_number(tail.lstrip().split("\n", 1)[0])
        if found is not None:
            return found
    marker = output.lower().find("the answer is")
    if marker >= 0:
        found = normalize_number(output[marker + len("the answer is") :])
        if found is not None:
            return found
    numbers = _NUMBER.findall(output.replace("$", ""))
    for candidate in reversed(numbers):
        found = normalize_number(candidate)
        if found is not None:
            return found
    return None


def answers_match(prediction: str | None, label: str | None) -> bool:
    """True when both are numbers and equal as numbers (``"3.0"`` == ``"3"``)."""
    if prediction is None or label is None:
        return False
    try:
        return abs(float(prediction) - float(label)) < 1e-6
    except ValueError:
        return False
