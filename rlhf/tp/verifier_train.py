"""Train a GSM8K verifier (reward model) on the tensor-parallel model (the description's ``verifier_train.py``).

::

    torchrun --nproc_per_node 8 -m rlhf.tp.verifier_train --ckpt_dir /path/to/your/ckpt/ \\
        --save_dir /path/to/save/ --train_file dataset/GSM8K/train.json --model_type llama-1-7b \\
        --max_batch_size 6 --lora_rank -1
    python -m rlhf.tp.verifier_train ...      # one process (TP=1)

The model gets a scalar head (``v_head``, zero-initialised unless ``--ckpt_dir`` is a verifier already)
read at the last token of question + solution + EOS, trained with binary cross-entropy on correct (1) /
incorrect (0). Plain GSM8K rows give the reference solution as a positive and the same solution with a
perturbed final answer as a negative; ``{"question", "output", "correct"}`` rows (``solver_evaluate``
samples) are used as they are (:mod:`rlhf.tp.verifier`). ``--eval_ratio`` holds out that share of the
questions with all their rows (grouped by question text, whatever the file layout). Held-out accuracy
(score > 0 = correct) goes to ``training/results.json``. Saved like the solver, with ``"head": "scalar"``
in ``params.json``.

The description's PPO command also runs ``verifier_train.py``, with the PPO trainer's flags: given
``--actor_ckpt_dir``, this module runs :mod:`rlhf.tp.ppo_train` with the same flags (one log line says so).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.args import parse_args
from rlhf.errors import exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.tp.distributed import process_group_scope
from rlhf.tp.examples import Example
from rlhf.tp.model import Transformer
from rlhf.tp.train_args import TPTrainArguments
from rlhf.tp.training import TrainTask, train_tp
from rlhf.tp.verifier import (
    last_token_scores,
    read_verifier_rows,
    score_examples,
    verifier_examples,
)

logger = logging.getLogger(__name__)


def verifier_loss(
    model: Transformer, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy of the last-token score against correct/incorrect; also the batch accuracy."""
    scores = last_token_scores(model, batch)
    loss = F.binary_cross_entropy_with_logits(scores, batch["targets"])
    accuracy = ((scores > 0).float() == batch["targets"]).float().mean()
    return loss, {"accuracy": accuracy.item()}


def held_out_accuracy(
    model: Transformer, examples: list[Example], batch_size: int, pad_id: int
) -> dict[str, float]:
    scores = score_examples(model, examples, batch_size, pad_id)
    targets = torch.tensor([e.target for e in examples])
    return {
        "eval_accuracy": ((scores > 0).float() == targets).float().mean().item(),
        "eval_loss": F.binary_cross_entropy_with_logits(scores, targets).item(),
        "eval_positive_share": targets.mean().item(),  # the accuracy of always answering "correct"
    }


def run(args: TPTrainArguments) -> dict:
    def make_examples(tokenizer) -> tuple[list[Example], list[Example]]:
        # all rows of a question (reference and perturbed, or its samples) stay on one side; rows longer
        # than --max_seq_len are dropped whole (counted), never cut
        rows = read_verifier_rows(args.train_file)
        return verifier_examples(tokenizer, rows, args.max_seq_len, args.eval_ratio, args.seed)

    return train_tp(
        args, TrainTask(scalar_head=True, loss=verifier_loss, evaluate=held_out_accuracy), make_examples
    )


PPO_FLAG = "--actor_ckpt_dir"  # only the PPO trainer takes it


@exit_on_user_error
def main(argv: list[str] | None = None) -> Any:
    """Train a verifier; with the PPO trainer's flags (the description's PPO command), run PPO instead."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.partition("=")[0].replace("-", "_") == PPO_FLAG.replace("-", "_") for arg in argv):
        # the description's PPO command runs verifier_train.py with the PPO trainer's flags
        from rlhf.tp import ppo_train

        logger.info(
            "%s is a PPO flag: running rlhf.tp.ppo_train, as the description's PPO command does", PPO_FLAG
        )
        return ppo_train.main(argv)
    (args,) = parse_args((TPTrainArguments,), argv)
    with process_group_scope():
        return run(args)


if __name__ == "__main__":
    main()
