"""The TP trainers' losses against references computed another way: ``solver_train``'s answer loss against
Hugging Face's own causal-LM loss of the same checkpoint, its held-out loss token-weighted over examples,
and ``verifier_train``'s loss and accuracy against a binary cross-entropy by hand, each sequence scored
alone without padding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.models import load_tokenizer
from rlhf.tp.examples import Example, collate
from rlhf.tp.loading import load_tp_model
from rlhf.tp.solver_train import answer_loss, held_out_loss, solver_example
from rlhf.tp.verifier_train import verifier_loss

CPU = torch.device("cpu")
QUESTIONS = [
    ("What is 2 plus 2?", "2+2=<<2+2=4>>4\n#### 4"),
    ("Tom has 3 apples and buys 5 more. How many apples does he have now?", "3+5=<<3+5=8>>8\n#### 8"),
    ("What is 9 plus 1?", "#### 10"),
]


@pytest.fixture
def solver_examples(tiny_llama) -> list[Example]:
    tokenizer = load_tokenizer(str(tiny_llama))
    return [solver_example(q, a, tokenizer, max_seq_len=512) for q, a in QUESTIONS]


def hf_token_losses(model_dir, example: Example) -> tuple[float, int]:
    """(summed next-token loss over the answer tokens, their number) of one unpadded example, by HF."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    labels = torch.tensor([example.labels])
    with torch.no_grad():
        mean = model(input_ids=torch.tensor([example.input_ids]), labels=labels).loss
    count = int((labels[:, 1:] != -100).sum())
    return float(mean) * count, count


def test_answer_loss_equals_hf_causal_lm_loss_on_a_padded_batch(tiny_llama, world_of_one, solver_examples):
    model = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=CPU).eval()
    batch = collate(solver_examples, pad_id=0, dev=CPU)
    assert len({len(e.input_ids) for e in solver_examples}) == 3  # padded to the longest
    with torch.no_grad():
        loss, stats = answer_loss(model, batch)
    sums, counts = zip(*(hf_token_losses(tiny_llama, e) for e in solver_examples))
    assert stats["answer_tokens"] == sum(counts)
    assert float(loss) == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    # held out, in micro-batches of 2: every answer token weighs the same, whatever its micro-batch
    with torch.no_grad():
        held_out = held_out_loss(model, solver_examples, batch_size=2, pad_id=0)
    assert held_out["eval_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


def test_verifier_loss_is_bce_at_each_sequences_last_token(tiny_llama, world_of_one, solver_examples):
    model = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=CPU, scalar_head=True).eval()
    with torch.no_grad():
        weight = torch.randn(model.v_head.weight.shape, generator=torch.Generator().manual_seed(0))
        model.v_head.weight.copy_(weight * 0.05)  # scores of order 1: the loss is not saturated
    examples = [Example(e.input_ids, target=t) for e, t in zip(solver_examples, (1.0, 0.0, 1.0))]
    with torch.no_grad():
        loss, stats = verifier_loss(model, collate(examples, pad_id=0, dev=CPU))
        alone = [
            float(model(torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids)))[0, -1])
            for e in examples
        ]
    assert len(set(alone)) == 3 and all(abs(s) < 5 for s in alone)
    by_hand = [
        -(t * math.log(1 / (1 + math.exp(-s))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-s))))
        for s, t in zip(alone, (1.0, 0.0, 1.0))
    ]
    assert float(loss) == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    assert stats["accuracy"] == pytest.approx(sum((s > 0) == bool(t) for s, t in zip(alone, (1, 0, 1))) / 3)
