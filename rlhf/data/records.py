"""Record formats: each parser validates one raw JSON object and returns a normalized row.

Normalized rows (what the stages see), one schema per kind:

- ``sft``: ``{"prompt": str, "prompt_messages": [{role, content}], "response": str}``
- ``preference``: ``{"prompt", "prompt_messages", "chosen": str, "rejected": str, "margin": float}`` (a
  conversational pair's prompt is ``prompt_messages``; its responses are its assistant messages' text)
- ``prompt`` (PPO): ``{"prompt", "prompt_messages"}``
- ``gsm8k``: ``{"question": str, "answer": str, "label": str}``

``prompt_messages`` is non-empty only for chat records; the prompt is then rendered with the tokenizer's
chat template by :func:`rlhf.data.templates.render_prompt`. Every error names ``file:line`` and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from datasets import Features, Value

from rlhf.data.files import optional_str, require_str
from rlhf.data.gsm8k import extract_gsm8k_label
from rlhf.data.templates import alpaca_prompt
from rlhf.errors import DataError

Record = dict[str, Any]
CHAT_ROLES = ("system", "user", "assistant")
FLOAT32_MAX = 3.4028234663852886e38  # the reward-model loss holds margins in float32
HH_ASSISTANT_TAG = "\n\nAssistant:"

_MESSAGES = [{"role": Value("string"), "content": Value("string")}]
FEATURES: dict[str, Features] = {
    "sft": Features({"prompt": Value("string"), "prompt_messages": _MESSAGES, "response": Value("string")}),
    "preference": Features(
        {
            "prompt": Value("string"),
            "prompt_messages": _MESSAGES,
            "chosen": Value("string"),
            "rejected": Value("string"),
            "margin": Value("float64"),
        }
    ),
    "prompt": Features({"prompt": Value("string"), "prompt_messages": _MESSAGES}),
    "gsm8k": Features({"question": Value("string"), "answer": Value("string"), "label": Value("string")}),
}


def _messages(record: Record, where: str, field: str = "messages") -> list[dict[str, str]]:
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: field "{field}" must be a non-empty list of {{"role", "content"}}')
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f'{where}: {field}[{i}] must be an object with "role" and "content"')
        role = require_str(message, "role", f"{where}: {field}[{i}]")
        if role not in CHAT_ROLES:
            raise DataError(
                f'{where}: {field}[{i}] has role "{role}" (expected one of {", ".join(CHAT_ROLES)})'
            )
        cleaned.append({"role": role, "content": require_str(message, "content", f"{where}: {field}[{i}]")})
    return cleaned


def _prompt_of(record: Record, where: str) -> tuple[str, list[dict[str, str]]]:
    """The prompt of an Alpaca (instruction/input) or prompt record."""
    if "instruction" in record:
        instruction = require_str(record, "instruction", where, allow_empty=False)
        return alpaca_prompt(instruction, optional_str(record, "input", where)), []
    if "prompt" in record:
        return require_str(record, "prompt", where, allow_empty=False), []
    raise DataError(f'{where}: missing field "instruction" or "prompt"')


def parse_sft(record: Record, where: str) -> Record:
    """Alpaca ``{instruction, input?, output}``, chat ``{messages}`` or ``{prompt, response}``."""
    if "messages" in record:
        messages = _messages(record, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f'{where}: the last message must have role "assistant" (it is the response)')
        if len(messages) < 2:  # the response would be trained with no template around it
            raise DataError(f'{where}: "messages" holds no prompt before the assistant turn')
        return {"prompt": "", "prompt_messages": messages[:-1], "response": messages[-1]["content"]}
    if "instruction" in record:
        prompt, _ = _prompt_of(record, where)
        return {"prompt": prompt, "prompt_messages": [], "response": require_str(record, "output", where)}
    if "prompt" in record:
        prompt, _ = _prompt_of(record, where)
        return {"prompt": prompt, "prompt_messages": [], "response": require_str(record, "response", where)}
    raise DataError(f'{where}: missing field "instruction", "messages" or "prompt"')


def split_hh_transcripts(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """Split Anthropic-HH transcripts into (prompt, chosen response, rejected response).

    The prompt is the shared prefix up to and including its last ``"\\n\\nAssistant:"``.
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT_TAG, 0, shared)
    if cut < 0 or cut + len(HH_ASSISTANT_TAG) > shared:
        raise DataError(
            f'{where}: "chosen" and "rejected" share no prefix ending in "\\n\\nAssistant:" (a pair without '
            f'"prompt" or "instruction" must be Anthropic-HH transcripts; accepted: {PREFERENCE_FORMATS})'
        )
    end = cut + len(HH_ASSISTANT_TAG)
    return chosen[:end], chosen[end:], rejected[end:]


PREFERENCE_FORMATS = (
    '{"instruction", "input"?, "chosen", "rejected"} or {"prompt", "chosen", "rejected"} with string '
    'responses; Anthropic-HH {"chosen", "rejected"} transcripts; or conversational (TRL) {"prompt": '
    '[messages], "chosen": [assistant message], "rejected": [assistant message]} or {"chosen": [messages], '
    '"rejected": [messages]} (a string "prompt" or a "messages" field beside those is ignored, as TRL does)'
)


def _response_turn(record: Record, where: str, side: str) -> str:
    """The content of ``record[side]``, a list holding one assistant message (conversational format)."""
    turns = _messages(record, where, side)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(
            f'{where}: field "{side}" must hold one message, of role "assistant" (the response to "prompt"), '
            f"got roles {', '.join(t['role'] for t in turns)}"
        )
    return turns[0]["content"]


def _conversational_pair(record: Record, where: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen response, rejected response) of a TRL conversational preference row:
    ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``, or with the prompt implicit,
    ``{"chosen": [messages], "rejected": [messages]}``: two conversations that differ only in their last,
    assistant, message. A string ``prompt`` beside conversations (HuggingFaceH4/ultrafeedback_binarized's
    layout) is ignored for the one the conversations hold, as TRL's ``maybe_extract_prompt`` does."""
    for side in ("chosen", "rejected"):
        if not isinstance(record[side], list):
            raise DataError(
                f'{where}: field "{side}" must be a list of messages like the other side, got '
                f"{type(record[side]).__name__}"
            )
    if isinstance(record.get("prompt"), list):
        prompt = _messages(record, where, "prompt")
        return prompt, _response_turn(record, where, "chosen"), _response_turn(record, where, "rejected")
    chosen, rejected = _messages(record, where, "chosen"), _messages(record, where, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError(f'{where}: the last message of "chosen" and of "rejected" must have role "assistant"')
    if isinstance(record.get("prompt"), str) and (len(chosen) < 2 or len(rejected) < 2):
        raise DataError(
            f'{where}: a string "prompt" beside conversations is read from them, and these hold only the '
            'responses: give the prompt as "prompt": [{"role": "user", "content": ...}]'
        )
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise DataError(
            f'{where}: "chosen" and "rejected" must be the same conversation (the prompt, at least one message) '
            'up to their last, assistant, message; or give the prompt as "prompt": [messages]'
        )
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def parse_preference(record: Record, where: str) -> Record:
    """``{instruction, input?, chosen, rejected}``, ``{prompt, chosen, rejected}``, HH ``{chosen, rejected}``
    or TRL's conversational ``{prompt?: [messages], chosen: [messages], rejected: [messages]}``
    (:data:`PREFERENCE_FORMATS`).

    An optional numeric ``margin`` is kept (default 0).
    """
    if "messages" in record and not isinstance(record.get("chosen"), list):  # beside conversations: ignored
        raise DataError(
            f'{where}: a preference row has no "messages" field; give the conversation as "prompt": [messages] '
            f"and each response as a list of one assistant message (accepted: {PREFERENCE_FORMATS})"
        )
    prompt_messages: list[dict[str, str]] = []
    conversational = isinstance(record.get("chosen"), list) and "instruction" not in record
    if conversational:
        for side in ("chosen", "rejected"):
            if side not in record:
                raise DataError(f'{where}: missing field "{side}"')
        prompt_messages, chosen, rejected = _conversational_pair(record, where)
    else:
        chosen = _response_str(record, "chosen", where)
        rejected = _response_str(record, "rejected", where)
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f'{where}: field "margin" must be a number, got {type(margin).__name__}')
    if isinstance(margin, float) and not math.isfinite(margin):
        raise DataError(f'{where}: field "margin" is {margin} (numbers in data must be finite)')
    if not abs(margin) <= FLOAT32_MAX:  # a float32 tensor in the loss: beyond this it is inf
        shown = f"{margin:.4g}" if abs(margin) < 1e308 else "beyond float64"
        raise DataError(f'{where}: field "margin" is {shown}, outside float32 range (±{FLOAT32_MAX:.4g})')
    if conversational:
        prompt = ""
    elif "instruction" in record or "prompt" in record:
        prompt, _ = _prompt_of(record, where)
    else:
        prompt, chosen, rejected = split_hh_transcripts(chosen, rejected, where)
    return {
        "prompt": prompt,
        "prompt_messages": prompt_messages,
        "chosen": chosen,
        "rejected": rejected,
        "margin": float(margin),
    }


def _response_str(record: Record, field: str, where: str) -> str:
    """``record[field]``, a string response (of a row that is not conversational)."""
    if isinstance(record.get(field), list):
        raise DataError(
            f'{where}: field "{field}" must be a string, got list (in a conversational pair "chosen", '
            '"rejected" and "prompt", if given, are all lists of messages)'
        )
    return require_str(record, field, where)


def parse_prompt(record: Record, where: str) -> Record:
    """A PPO prompt: the prompt part of any SFT record, or ``{prompt}``."""
    if "messages" in record:
        messages = _messages(record, where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f'{where}: "messages" holds no prompt before the assistant turn')
        return {"prompt": "", "prompt_messages": messages}
    if "instruction" not in record and "prompt" not in record:
        raise DataError(f'{where}: missing field "instruction", "messages" or "prompt"')
    prompt, messages = _prompt_of(record, where)
    return {"prompt": prompt, "prompt_messages": messages}


def parse_gsm8k(record: Record, where: str) -> Record:
    """``{question, answer}`` where the answer ends with ``#### <number>``."""
    question = require_str(record, "question", where, allow_empty=False)
    answer = require_str(record, "answer", where)
    label = extract_gsm8k_label(answer)
    if label is None:
        raise DataError(f'{where}: field "answer" has no final answer after "####"')
    return {"question": question, "answer": answer, "label": label}


PARSERS: dict[str, Callable[[Record, str], Record]] = {
    "sft": parse_sft,
    "preference": parse_preference,
    "prompt": parse_prompt,
    "gsm8k": parse_gsm8k,
}
