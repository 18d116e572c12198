"""The GSM8K verifier: what it reads, how its examples are made, and how it scores a solution.

A verifier is the TP model with a scalar head (:class:`rlhf.tp.model.ScalarHeadTransformer`). It reads
exactly what the solver sees and writes::

    gsm8k_prompt(question) + gsm8k_target(solution) + EOS

and its score is the head's output at the last real token: a logit, > 0 meaning "correct". The same score
ranks samples in best-of-N (``solver_evaluate --verifier_ckpt_dir``) and is the PPO reward.

Training rows (``--train_file``), one of two kinds per row:

- ``{"question", "answer"}`` (plain GSM8K): the reference solution is a positive; a negative is the same
  solution with its final answer (after ``####``) replaced by a wrong number (``perturb_final_answer``:
  the label plus a seeded non-zero offset in [-10, 10], or doubled for non-integers);
- ``{"question", "output", "correct"}`` (what ``solver_evaluate --num_samples K --temperature T`` writes
  to ``predictions.jsonl``): real solver samples with their correctness.

A row longer than ``--max_seq_len`` is dropped (one warning counts them), never cut: its left end holds BOS
and the question, its right end the final answer and the EOS where the score is read.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.data import split_rows
from rlhf.data.files import find_data_files, iter_json_records
from rlhf.data.gsm8k import extract_gsm8k_label, find_number, normalize_number
from rlhf.data.templates import encode_prompt_text
from rlhf.errors import CheckpointError, DataError
from rlhf.tp.distributed import is_main
from rlhf.tp.examples import Example, collate, micro_batches
from rlhf.tp.loading import checkpoint_head
from rlhf.tp.model import Transformer
from rlhf.tp.prompt import gsm8k_prompt, gsm8k_target
from rlhf.tp.shard_dir import check_shard_dir, is_shard_dir

logger = logging.getLogger(__name__)


def perturb_final_answer(answer: str, rng: random.Random) -> str:
    """``answer`` with the number after its last ``####`` replaced by a different one, written alike.

    Only the number changes, so the negatives leave the verifier no shortcut but the value: thousands
    separators are kept when the reference has them (``#### 1,000`` -> ``#### 1,007``), and a label that
    is not negative gets a wrong answer that is not negative either (GSM8K's answers almost never are).
    """
    head, _, tail = answer.rpartition("####")
    label = normalize_number(tail)
    match = find_number(tail)
    if label is None or match is None:
        raise DataError(f'answer has no final number after "####": {answer[-60:]!r}')
    if "." in label:
        wrong = normalize_number(str(float(label) * 2)) if float(label) != 0 else "1"
    else:
        value = int(label)
        deltas = [d for d in range(-10, 11) if d != 0 and (value < 0 or value + d >= 0)]
        wrong = str(value + rng.choice(deltas))
        if "," in match.group(0):
            wrong = f"{int(wrong):,}"
    return f"{head}####{tail[: match.start()]}{wrong}{tail[match.end() :]}"


def question_key(question: str) -> str:
    """What rows of the same question share: its text with runs of whitespace collapsed."""
    return " ".join(question.split())


def split_by_question(
    rows: list[dict[str, Any]], ratio: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) rows: a seeded ``ratio`` share of the questions (``group``) is held out with all
    their rows, so no held-out solution has its question in training."""
    groups = sorted({r["group"] for r in rows})
    train_groups, _ = split_rows(groups, ratio, seed)
    keep = set(train_groups)
    return [r for r in rows if r["group"] in keep], [r for r in rows if r["group"] not in keep]


def read_verifier_rows(path: str) -> list[dict[str, Any]]:
    """``{"question", "solution", "correct"}`` rows from GSM8K rows (reference + perturbed) or solver samples.

    ``group`` is the question (whitespace collapsed): a GSM8K row's reference and perturbed rows, and all
    samples of one question, are kept on the same side of the held-out split (:func:`split_by_question`),
    wherever they are in the files.
    """
    rows, rng = [], random.Random(0)
    for file in find_data_files(path):
        for where, record in iter_json_records(file):
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f'{where}: needs a non-empty "question"')
            if "output" in record and "correct" in record:
                if not isinstance(record["correct"], bool) or not isinstance(record["output"], str):
                    raise DataError(f'{where}: "output" must be a string and "correct" true or false')
                rows.append({"question": question, "solution": record["output"], "correct": record["correct"],
                             "group": question_key(question)})  # fmt: skip
            elif isinstance(record.get("answer"), str):
                if extract_gsm8k_label(record["answer"]) is None:
                    raise DataError(f'{where}: field "answer" has no final answer after "####"')
                wrong = perturb_final_answer(record["answer"], rng)
                group = question_key(question)
                rows.append(
                    {"question": question, "solution": record["answer"], "correct": True, "group": group}
                )
                rows.append({"question": question, "solution": wrong, "correct": False, "group": group})
            else:
                raise DataError(
                    f'{where}: expected {{"question", "answer"}} or {{"question", "output", "correct"}}'
                )
    if not rows:
        raise DataError(f"{path}: no rows")
    if len({row["correct"] for row in rows}) == 1:
        kind = "correct" if rows[0]["correct"] else "incorrect"
        logger.warning(
            "%s: all %d solutions are %s: the verifier learns to give every solution the same score (mix "
            "correct and incorrect solutions, or give GSM8K rows with their answers)", path, len(rows), kind,
        )  # fmt: skip
    return rows


def verifier_ids(tokenizer: Any, question: str, solution: str) -> list[int]:
    """Token ids of prompt + solution + EOS, as the solver would have produced them."""
    ids = encode_prompt_text(gsm8k_prompt(question), tokenizer)
    ids = ids + tokenizer(gsm8k_target(solution), add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def whole_example(tokenizer: Any, row: dict[str, Any]) -> Example:
    """The row's prompt + solution + EOS, uncut, with its target: 1.0 correct, 0.0 incorrect (read at EOS)."""
    ids = verifier_ids(tokenizer, row["question"], row["solution"])
    return Example(ids, target=1.0 if row["correct"] else 0.0)


def verifier_example(tokenizer: Any, row: dict[str, Any], max_seq_len: int) -> Example:
    """:func:`whole_example`, refused when longer than ``max_seq_len``: never cut, since the left end holds
    BOS and the question and the right end the final answer and the EOS where the score is read
    (:func:`verifier_examples` drops such rows instead)."""
    example = whole_example(tokenizer, row)
    if len(example.input_ids) > max_seq_len:
        raise DataError(
            f"a verifier row is {len(example.input_ids)} tokens (question + solution + EOS), longer than "
            f"--max_seq_len {max_seq_len}: raise --max_seq_len"
        )
    return example


def verifier_examples(
    tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, eval_ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of ``rows``, split by question (:func:`split_by_question`).

    Rows longer than ``max_seq_len`` (question + solution + EOS) are dropped with one warning for both
    parts: cut at either end, an example would lose its question or the final answer its label is about
    (``solver_train`` keeps a cut answer, with a warning that counts them, as the SFT stage does). None left to train on is an error naming
    ``--max_seq_len``."""
    parts, dropped, longest = [], 0, 0
    for part in split_by_question(rows, eval_ratio, seed):
        examples = [whole_example(tokenizer, r) for r in part]
        parts.append([e for e in examples if len(e.input_ids) <= max_seq_len])
        dropped += len(examples) - len(parts[-1])
        longest = max([longest, *(len(e.input_ids) for e in examples)])
    if dropped:
        logger.warning(
            "%d of %d examples longer than --max_seq_len %d dropped (question + solution + EOS; the longest "
            "is %d tokens)", dropped, len(rows), max_seq_len, longest,
        )  # fmt: skip
    if not parts[0]:
        held = f" and the {len(parts[1])} that fit are held out (--eval_ratio)" if parts[1] else ""
        raise DataError(
            f"no training example fits --max_seq_len {max_seq_len}: {dropped} of {len(rows)} are longer "
            f"(up to {longest} tokens){held}; raise --max_seq_len"
        )
    return parts[0], parts[1]


def last_token_scores(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores (B,) at each sequence's last real token of a right-padded collated batch."""
    scores = model(batch["input_ids"], batch["attention_mask"])  # (B, T)
    return scores.gather(1, batch["last"][:, None]).squeeze(1).float()


@torch.no_grad()
def score_examples(model: Transformer, examples: list[Example], batch_size: int, pad_id: int) -> torch.Tensor:
    """Verifier scores (N,) of ``examples``, in order, on CPU (a progress bar on the main rank)."""
    dev = next(model.parameters()).device
    parts = []
    with tqdm(total=len(examples), desc="verifier", unit="solution", disable=not is_main()) as progress:
        for chunk in micro_batches(examples, batch_size):
            parts.append(last_token_scores(model, collate(chunk, pad_id, dev)).cpu())
            progress.update(len(chunk))
    return torch.cat(parts) if parts else torch.zeros(0)


def score_solutions(
    model: Transformer, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int
) -> list[float]:
    """Verifier scores of (question, solution) pairs, each read whole (as the solver wrote it: BOS and the
    question kept, the score at the EOS after the final answer)."""
    examples = [Example(verifier_ids(tokenizer, q, s)) for q, s in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_examples(model, examples, batch_size, pad_id).tolist()


def check_verifier_dir(path: str, world_size: int, flag: str = "--verifier_ckpt_dir") -> None:
    """Up-front check of a dir that must hold a verifier (``--verifier_ckpt_dir``,
    ``--reward_model_ckpt_dir``): a whole scalar-head shard dir for this world size, or an HF
    ``...ForSequenceClassification`` dir with one label (split in memory). A solver, an HF causal LM or an
    adapter dir would load with a zero-initialised head and score every solution 0: refused, naming ``flag``."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{flag} {path}: no such directory (pass the --save_dir of verifier_train)")
    if is_shard_dir(path):
        check_shard_dir(path, world_size)
    if checkpoint_head(path) != "scalar":
        kind = (
            "a solver (params.json head is not scalar)"
            if is_shard_dir(path)
            else "a causal LM (no score head)"
        )
        raise CheckpointError(f"{flag} {path}: {kind}, not a verifier: pass the --save_dir of verifier_train")
