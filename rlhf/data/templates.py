"""Prompt templates: how an instruction record or a chat becomes the text the model is conditioned on.

Alpaca-style records (``instruction`` + optional ``input``) use the Stanford Alpaca template below, the one
Chinese-LLaMA-Alpaca and most SFT data of that family were trained with. Chat records (``messages``) use
the tokenizer's own chat template; a tokenizer without one falls back to ``"<role>: <content>\\n"`` lines
ending in ``"assistant: "``. ``{"prompt": ...}`` records are used verbatim.
"""

from __future__ import annotations

import sys
from typing import Any

from rlhf.errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction (and its optional input)."""
    if input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def render_chat_prompt(messages: list[dict[str, str]], tokenizer: Any, where: str = "") -> str:
    """Render the conversation so far, ending where the assistant's next turn begins.

    A template that refuses the conversation (Llama-2 and Mistral-Instruct templates raise on roles that do
    not alternate user/assistant) is a DataError naming ``where``, the row's ``file:line``.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            jinja2 = sys.modules.get("jinja2")  # loaded by any template that got to raise (not a dependency)
            if jinja2 is None or not isinstance(exc, jinja2.TemplateError):
                raise
            roles = ", ".join(m["role"] for m in messages)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(
                f"{where or 'a chat row'}: the tokenizer's chat template rejects this conversation "
                f"(roles {roles}): {reason}"
            ) from None
    lines = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(lines) + "assistant: "


def render_prompt(row: dict[str, Any], tokenizer: Any) -> str:
    """The prompt text of a normalized row: chat rows through the template, others as stored."""
    messages = row.get("prompt_messages") or []
    if messages:
        return render_chat_prompt(messages, tokenizer, row.get("where") or "")
    return row["prompt"]


def tokenize_prompt(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """Token ids of a row's prompt, with the tokenizer's BOS exactly once.

    Chat templates of real checkpoints often write the BOS token into the text themselves; encoding such
    text with special tokens would put a second BOS in front.
    """
    return encode_rendered_prompt(render_prompt(row, tokenizer), tokenizer)


def encode_rendered_prompt(text: str, tokenizer: Any) -> list[int]:
    """A rendered prompt's ids with ``tokenizer``'s BOS exactly once: none added when the text already starts
    with it (a chat template that writes it), else as :func:`encode_prompt_text` adds it."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode_prompt_text(text, tokenizer)


def encode_prompt_text(text: str, tokenizer: Any) -> list[int]:
    """``tokenizer(text)``'s ids (BOS added when the tokenizer adds one) without an appended EOS."""
    return without_appended_eos(tokenizer(text)["input_ids"], text, tokenizer)


def without_appended_eos(ids: list[int], text: str, tokenizer: Any) -> list[int]:
    """``ids`` less the EOS a tokenizer's post-processor appended (Llama tokenizers saved with
    ``add_eos_token=True``): a prompt, or a pretraining document that gets its EOS by id, must not end in a
    second one. An EOS the text itself ends with stays."""
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None and ids and ids[-1] == eos_id and not (eos and text.rstrip().endswith(eos)):
        return ids[:-1]
    return ids
