"""The GSM8K prompt of the TP solver: what ``solver_evaluate`` feeds and what solver training should teach.

A question becomes::

    Question: {question}
    Answer:

and the model continues with the solution, ending in ``#### <number>`` (GSM8K's own answer format), then
EOS. Training targets are therefore ``" " + answer`` followed by EOS. Prompts are tokenized exactly as
``tokenizer(prompt)`` does (BOS added by the tokenizer when it adds one; an EOS it appends dropped).
"""

from __future__ import annotations

GSM8K_PROMPT = "Question: {question}\nAnswer:"


def gsm8k_prompt(question: str) -> str:
    return GSM8K_PROMPT.format(question=question.strip())


def gsm8k_target(answer: str) -> str:
    """The continuation a solver is trained to produce after :func:`gsm8k_prompt` (EOS added by the caller)."""
    return " " + answer.strip()
