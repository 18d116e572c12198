"""GSM8K: the label after ``####`` and the number a model's solution ends with."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``; ``"$7"`` -> ``"7"``; None when ``text`` holds no number."""
    match = _NUMBER.search(text.replace("$", ""))
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

    Preference order: after the last ``####``; after "the answer is"; else the last number in the text.
    """
    if "####" in output:
        found = normalize_number(output.rsplit("####", 1)[1])
        if found is not None:
            return found
    lowered = output.lower()
    marker = lowered.rfind("the answer is")
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
