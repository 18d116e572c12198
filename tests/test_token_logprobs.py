"""Chunked token log-probs and entropy equal the unchunked ones, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf.ppo.stats import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.token_logprobs import chunked_token_logprobs


def setup(seed: int = 0, batch: int = 3, length: int = 11, hidden: int = 8, vocab: int = 37):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=gen, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    return states, head, tokens


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])  # 4 does not divide 11; 64 is longer than the sequence
def test_chunked_equals_unchunked_values_and_gradients(chunk_size):
    temperature = 0.7
    states, head, tokens = setup()
    logits = head(states)
    ref_lp = logprobs_from_logits(logits, tokens, temperature)
    ref_ent = entropy_from_logits(logits, temperature)
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    ref_grads = states.grad.clone(), head.weight.grad.clone()
    states.grad, head.weight.grad = None, None

    lp, ent = chunked_token_logprobs(head, states, tokens, temperature, chunk_size, with_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    (lp.sum() + 0.3 * ent.sum()).backward()
    # gradients: the head's is summed over chunks in another order, so float32 rounding differs slightly
    torch.testing.assert_close(states.grad, ref_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_grads[1], atol=1e-5, rtol=1e-5)


def test_without_grad_and_without_entropy():
    states, head, tokens = setup(seed=1)
    with torch.no_grad():
        lp, ent = chunked_token_logprobs(head, states, tokens, 1.0, 3)
        ref = logprobs_from_logits(head(states), tokens)
    assert ent is None and not lp.requires_grad
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)


def test_bfloat16_head_gives_float32_outputs():
    states, head, tokens = setup(seed=2)
    head = head.to(torch.bfloat16)
    with torch.no_grad():
        lp, ent = chunked_token_logprobs(head, states.bfloat16(), tokens, 1.0, 5, with_entropy=True)
        ref = logprobs_from_logits(head(states.bfloat16()), tokens)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_entropy_as_a_metric_only_has_no_backward(chunk_size):
    """``entropy_grad=False`` (the loop at --entropy_coef 0): the same entropy values and log-prob gradients,
    no graph behind the entropy, and its ops neither recomputed nor differentiated in the backward."""
    states, head, tokens = setup(seed=3)
    runs = {}
    for entropy_grad in (True, False):
        states.grad, head.weight.grad = None, None
        lp, ent = chunked_token_logprobs(
            head, states, tokens, 0.7, chunk_size, with_entropy=True, entropy_grad=entropy_grad
        )
        with CountOps() as ops:
            (lp.sum() - 0.0 * ent.sum()).backward()
        runs[entropy_grad] = (
            ent.detach(),
            ent.requires_grad,
            states.grad.clone(),
            head.weight.grad.clone(),
            ops,
        )
    (ent_a, grad_a, *grads_a, ops_a), (ent_b, grad_b, *grads_b, ops_b) = runs[True], runs[False]
    assert grad_a and not grad_b
    assert torch.equal(ent_a, ent_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert ops_a.names.count("exp") > 0 and ops_b.names.count("exp") == 0  # p = exp(log p): the entropy's
    assert len(ops_b.names) < len(ops_a.names)
