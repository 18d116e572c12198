"""Critic-free advantage estimators against loop-based references on random inputs."""

from __future__ import annotations

import statistics
import threading

import pytest
import torch

from rlhf.ppo.estimators import (
    discounted_returns,
    dr_grpo_advantages,
    global_masked_whiten,
    group_centred_scores,
    group_stats,
    grpo_advantages,
    mean_group_std,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf.ppo.stats import masked_whiten


def random_rollout(seed: int, groups: int = 5, k: int = 4, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    n = groups * k
    scores = torch.randn(n, generator=gen, dtype=torch.float64)
    group_ids = torch.arange(groups).repeat_interleave(k)
    group_ids = group_ids[torch.randperm(n, generator=gen)]  # groups need not be contiguous
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).double()
    return scores, group_ids, mask


def members(group_ids: torch.Tensor, i: int) -> list[int]:
    return [j for j in range(len(group_ids)) if group_ids[j] == group_ids[i]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_estimators_match_per_response_loops(seed):
    scores, group_ids, mask = random_rollout(seed)
    grpo = grpo_advantages(scores, group_ids, mask, eps=1e-6)
    dr = dr_grpo_advantages(scores, group_ids, mask)
    rloo = rloo_advantages(scores, group_ids, mask)
    for i in range(len(scores)):
        group = [float(scores[j]) for j in members(group_ids, i)]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        others = [float(scores[j]) for j in members(group_ids, i) if j != i]
        expected = {
            "grpo": (float(scores[i]) - mean) / (std + 1e-6),
            "dr": float(scores[i]) - mean,
            "rloo": float(scores[i]) - sum(others) / len(others),
        }
        for name, adv in (("grpo", grpo), ("dr", dr), ("rloo", rloo)):
            row = adv[i][mask[i].bool()]
            assert torch.allclose(row, torch.full_like(row, expected[name]), atol=1e-12), name
            assert (adv[i][~mask[i].bool()] == 0).all()


def test_group_stats_and_centring():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, 4.0])
    group_ids = torch.tensor([7, 7, 2, 2, 9])
    mean, std, count = group_stats(scores, group_ids)
    assert mean.tolist() == [2.0, 2.0, 10.0, 10.0, 4.0]
    assert torch.allclose(std, torch.tensor([2**0.5, 2**0.5, 0.0, 0.0, 0.0]))
    assert count.tolist() == [2, 2, 2, 2, 1]
    assert group_centred_scores(scores, group_ids).tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0]
    # mean over the three groups of their std: (sqrt 2 + 0 + 0) / 3
    assert torch.isclose(mean_group_std(scores, group_ids), torch.tensor(2**0.5 / 3))


def test_discounted_returns_match_a_loop():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    ).double()
    gamma = 0.9
    got = discounted_returns(rewards, mask, gamma)
    for b in range(4):
        n = int(mask[b].sum())
        for t in range(6):
            expected = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, n)) if t < n else 0.0
            assert abs(float(got[b, t]) - expected) < 1e-12


class ThreadAllReduce:
    """A summing all-reduce between ``n`` threads: each call blocks until every thread has handed in its
    tensor, then all get the sum (what the backend's reduce_sum does between processes)."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n)
        self.slots: list[torch.Tensor | None] = [None] * n

    def for_rank(self, rank: int):
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # everyone has read the slots before the next call writes them
            return total

        return reduce_sum


def whiten_in_threads(parts, **kw) -> list[torch.Tensor]:
    """Each (values, mask) part whitened by its own thread, the threads joined by a summing all-reduce."""
    reduce = ThreadAllReduce(len(parts))
    out: list[torch.Tensor | None] = [None] * len(parts)

    def run(rank: int) -> None:
        v, m = parts[rank]
        out[rank] = global_masked_whiten(v, m, reduce.for_rank(rank), **kw)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
def test_global_whitening_equals_whitening_the_gathered_tokens(shift_mean):
    """Three 'processes' (threads) whiten their rows with a summing all-reduce; the result equals one process
    whitening everything (masked_whiten, the single-process reference)."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(7, 5, generator=gen) > 0.3).double()
    parts = [(values[:3], mask[:3]), (values[3:4], mask[3:4]), (values[4:], mask[4:])]
    got = torch.cat(whiten_in_threads(parts, shift_mean=shift_mean))
    expected = masked_whiten(values, mask, shift_mean=shift_mean) * mask
    assert torch.allclose(got, expected, atol=1e-10)
    assert not torch.allclose(
        global_masked_whiten(values[:3], mask[:3], lambda t: t), expected[:3], atol=1e-3
    )  # whitening one part alone is not the same


def test_global_whitening_on_one_process_is_masked_whiten_bit_for_bit():
    """float32, as the loop runs it: with an identity all-reduce the GAE advantages are today's exactly."""
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(6, 9, generator=gen) * 2 - 0.5
    mask = (torch.rand(6, 9, generator=gen) > 0.4).float()
    for shift_mean in (True, False):
        expected = masked_whiten(values, mask, shift_mean=shift_mean) * mask
        assert torch.equal(global_masked_whiten(values, mask, lambda t: t, shift_mean=shift_mean), expected)


def test_reinforce_pp_whitens_discounted_returns():
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones(5, 4, dtype=torch.float64)
    mask[1, 2:] = 0
    advantages, returns = reinforce_pp_advantages(rewards, mask, 1.0, lambda t: t)
    assert torch.allclose(returns, discounted_returns(rewards, mask, 1.0))
    assert torch.allclose(advantages, masked_whiten(returns, mask) * mask, atol=1e-10)
    tokens = advantages[mask.bool()]
    assert abs(float(tokens.mean())) < 1e-10 and abs(float(tokens.std()) - 1.0) < 1e-6
