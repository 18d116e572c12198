"""Train a GSM8K solver on the tensor-parallel model (the Llama-RLHF description's ``solver_train.py``).

::

    torchrun --nproc_per_node 8 -m rlhf.tp.solver_train --ckpt_dir /path/to/your/ckpt/ \\
        --save_dir /path/to/save/ --train_file dataset/GSM8K/train.json --model_type llama-1-7b \\
        --max_batch_size 6 --lora_rank -1
    python -m rlhf.tp.solver_train ...        # one process (TP=1), CPU or one GPU

Each GSM8K row becomes ``gsm8k_prompt(question)`` followed by ``gsm8k_target(answer)`` + EOS; the loss is
next-token cross-entropy on the answer tokens only. ``--save_dir`` receives shards + ``params.json`` +
tokenizer that ``solver_evaluate`` and ``checkpoint_split.py --merge`` take. See ``docs/tp.md``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.args import parse_args
from rlhf.data import load_dataset_dir, split_rows
from rlhf.data.templates import encode_prompt_text
from rlhf.errors import exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.tp.distributed import process_group_scope
from rlhf.tp.examples import Example, collate, micro_batches
from rlhf.tp.model import Transformer
from rlhf.tp.prompt import gsm8k_prompt, gsm8k_target
from rlhf.tp.train_args import TPTrainArguments
from rlhf.tp.training import TrainTask, train_tp

logger = logging.getLogger(__name__)


def solver_example(question: str, answer: str, tokenizer: Any, max_seq_len: int) -> Example | None:
    """Prompt + answer + EOS, labels -100 on the prompt; cut to ``max_seq_len`` tokens (None when no
    answer token is left; ``cut`` when the answer lost its end)."""
    prompt = encode_prompt_text(gsm8k_prompt(question), tokenizer)
    target = tokenizer(gsm8k_target(answer), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    ids = (prompt + target)[:max_seq_len]
    labels = ([-100] * len(prompt) + target)[:max_seq_len]
    if len(prompt) >= max_seq_len:  # not one answer token left to learn
        return None
    return Example(ids, labels=labels, cut=len(prompt) + len(target) > max_seq_len)


def answer_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the answer tokens of the micro-batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V), the same on every rank
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss, {"answer_tokens": float((labels != -100).sum())}


def held_out_loss(
    model: Transformer, examples: list[Example], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted answer loss on the held-out rows."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0.0
    for chunk in micro_batches(examples, batch_size):
        loss, stats = answer_loss(model, collate(chunk, pad_id, dev))
        total += loss.item() * stats["answer_tokens"]
        count += stats["answer_tokens"]
    return {"eval_loss": total / max(count, 1.0)}


def run(args: TPTrainArguments) -> dict:
    def make_examples(tokenizer) -> tuple[list[Example], list[Example]]:
        rows = list(load_dataset_dir(args.train_file, "gsm8k"))
        parts = []
        for part in split_rows(rows, args.eval_ratio, args.seed):
            examples = [solver_example(r["question"], r["answer"], tokenizer, args.max_seq_len) for r in part]
            parts.append([e for e in examples if e is not None])
            if len(parts[-1]) < len(examples):
                logger.warning(
                    "%d rows dropped: their prompt fills --max_seq_len %d", len(examples) - len(parts[-1]),
                    args.max_seq_len,
                )  # fmt: skip
        cut = sum(e.cut for part in parts for e in part)
        if cut:
            logger.warning(
                "%d of %d rows cut at --max_seq_len %d: their answers lose the end (the final #### line, the "
                "EOS), so the solver learns to stop short; raise --max_seq_len",
                cut, sum(len(part) for part in parts), args.max_seq_len,
            )  # fmt: skip
        return parts[0], parts[1]

    return train_tp(
        args, TrainTask(scalar_head=False, loss=answer_loss, evaluate=held_out_loss), make_examples
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_args((TPTrainArguments,), argv)
    with process_group_scope():
        return run(args)


if __name__ == "__main__":
    main()
