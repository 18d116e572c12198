"""The PPO losses and rollout statistics under data parallelism: 'processes' (threads joined by a summing
all-reduce, as the backend's reduce_sum) whose averaged gradients and reported statistics equal one process
computing them over the gathered mini-batch (docs/ppo.md: every token of the mini-batch weighs the same)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_ppo_estimators import ThreadAllReduce

from rlhf.ppo.losses import entropy_bonus, kl_loss, policy_loss, value_loss
from rlhf.ppo.stats import explained_variance, global_masked_moments, tokens_per_process


def in_threads(n: int, fn) -> list:
    """``fn(rank, reduce_sum)`` in ``n`` threads joined by a summing all-reduce; their results by rank."""
    reduce = ThreadAllReduce(n)
    out: list = [None] * n

    def run(rank: int) -> None:
        out[rank] = fn(rank, reduce.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def mini_batch(seed: int = 0):
    """4 responses of lengths 8, 8, 2, 2 (ranks 0 and 1 hold two each: long ones on rank 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 8)
    for row, length in enumerate((8, 8, 2, 2)):
        mask[row, :length] = 1
    tensors = {
        name: torch.randn(4, 8, generator=g) for name in ("logprobs", "old", "adv", "ref", "values", "ret")
    }
    tensors["entropy"] = torch.rand(4, 8, generator=g)
    return mask, tensors


def losses(t: dict, mask: torch.Tensor, rows: slice, count: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    logprobs, values = t["logprobs"][rows], t["values"][rows]
    m = mask[rows]
    policy = policy_loss(logprobs, t["old"][rows], t["adv"][rows], m, 0.2, "token-mean", None, count).loss
    value = value_loss(values, values.detach() + 0.05, t["ret"][rows], m, 0.2, count).loss
    kl = kl_loss(logprobs, t["ref"][rows], m, count)
    entropy = entropy_bonus(t["entropy"][rows] * logprobs, m, count)  # something with a gradient
    return policy, value, kl, entropy


@pytest.mark.parametrize("term", range(4), ids=["policy", "value", "kl", "entropy"])
def test_averaged_gradients_of_two_processes_equal_one_process_on_the_whole_mini_batch(term):
    mask, base = mini_batch()

    def gradients(rows: slice, count_fn) -> tuple[torch.Tensor, torch.Tensor]:
        t = {k: v.clone().requires_grad_(k in ("logprobs", "values")) for k, v in base.items()}
        losses(t, mask, rows, count_fn(mask[rows]))[term].backward()
        grad_lp = t["logprobs"].grad if t["logprobs"].grad is not None else torch.zeros(4, 8)
        grad_v = t["values"].grad if t["values"].grad is not None else torch.zeros(4, 8)
        return grad_lp, grad_v

    expected = gradients(slice(0, 4), lambda m: None)  # one process, the whole mini-batch
    per_rank = in_threads(
        2,
        lambda rank, reduce_sum: gradients(
            slice(2 * rank, 2 * rank + 2), lambda m: tokens_per_process(m, reduce_sum, 2)
        ),
    )
    for i in range(2):
        averaged = (per_rank[0][i] + per_rank[1][i]) / 2  # what the backend's gradient all-reduce does
        torch.testing.assert_close(averaged, expected[i], rtol=1e-6, atol=1e-7)
    # without the global count each process weighs its own tokens: the short responses' tokens count 4x
    local = in_threads(2, lambda rank, reduce_sum: gradients(slice(2 * rank, 2 * rank + 2), lambda m: None))
    assert not torch.allclose(
        (local[0][0] + local[1][0]) / 2 + (local[0][1] + local[1][1]) / 2, expected[0] + expected[1]
    )


def test_one_process_with_its_own_count_is_bit_for_bit_the_plain_loss():
    mask, t = mini_batch(1)
    count = tokens_per_process(mask, lambda x: x, 1)
    for with_count, plain in zip(losses(t, mask, slice(0, 4), count), losses(t, mask, slice(0, 4), None)):
        assert torch.equal(with_count, plain)


def test_explained_variance_and_score_spread_are_over_all_processes():
    mask, t = mini_batch(2)
    scores = torch.tensor([0.0, 0.1, 2.0, 2.2])
    expected_ev = explained_variance(t["values"], t["ret"], mask)
    expected_std = scores.std(unbiased=False)

    def stats(rank: int, reduce_sum):
        rows = slice(2 * rank, 2 * rank + 2)
        ev = explained_variance(t["values"][rows], t["ret"][rows], mask[rows], reduce_sum)
        var = global_masked_moments(scores[rows], torch.ones(2), reduce_sum, unbiased=False)[1]
        return ev, var.sqrt()

    for ev, std in in_threads(2, stats):
        torch.testing.assert_close(ev, expected_ev, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, expected_std, rtol=1e-5, atol=1e-6)
    # the mean of the two processes' own spreads (what was logged before) is not the spread of the rollout
    local_std = (scores[:2].std(unbiased=False) + scores[2:].std(unbiased=False)) / 2
    assert abs(float(local_std) - float(expected_std)) > 0.5
    assert torch.equal(explained_variance(t["values"], t["ret"], mask, lambda x: x), expected_ev)
