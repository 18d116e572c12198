"""Advantage estimators against loop-based references on random inputs: the pure functions, the seam of
steps 4–5 (estimate_advantages) with global whitening over simulated processes, the KL loss, the buffer."""

from __future__ import annotations

import math
import statistics
import threading

import pytest
import torch

from rlhf.ppo.advantages import gae_advantages
from rlhf.ppo.batch import RolloutBuffer, SequenceBatch
from rlhf.ppo.estimators import (
    EstimatorSettings,
    discounted_returns,
    dr_grpo_advantages,
    estimate_advantages,
    global_masked_whiten,
    group_centred_scores,
    group_stats,
    grpo_advantages,
    mean_group_std,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf.ppo.kl import kl_shaped_rewards
from rlhf.ppo.losses import kl_loss
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


def rollout_tensors(seed: int, groups: int = 3, k: int = 3, length: int = 6):
    """float32 scores, KL, values and masks as the loop holds them."""
    scores, group_ids, mask = random_rollout(seed, groups, k, length)
    gen = torch.Generator().manual_seed(seed + 100)
    kl = torch.randn(mask.shape, generator=gen).abs() * 0.1
    values = torch.randn(mask.shape, generator=gen)
    return scores.float(), group_ids, mask.float(), kl * mask.float(), values * mask.float()


def test_estimate_advantages_gae_is_the_pre_estimator_pipeline_bit_for_bit():
    """gae on one process: KL-shaped rewards (optionally whitened), GAE, whitened advantages, exactly as the
    loop computed them before the estimator seam (masked_whiten, per process)."""
    scores, group_ids, mask, kl, values = rollout_tensors(7)
    for whiten_rewards in (False, True):
        settings = EstimatorSettings("gae", gamma=0.9, lam=0.8, whiten_rewards=whiten_rewards)
        got = estimate_advantages(
            settings, scores=scores, kl=kl, mask=mask, beta=0.1, group_ids=group_ids, values=values,
            reduce_sum=lambda t: t,
        )  # fmt: skip
        rewards, _ = kl_shaped_rewards(scores, kl, mask, 0.1)
        if whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae_advantages(rewards, values, mask, 0.9, 0.8)
        assert torch.equal(got.advantages, masked_whiten(advantages, mask) * mask)
        assert torch.equal(got.returns, returns)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_estimate_advantages_sequence_estimators_take_the_kl_in_the_score_or_not(estimator, kl_in_reward):
    """r_i − β·Σ_t KL_t goes through the group estimator (with --use_kl_loss: r_i alone); for grpo, r_i
    does and −β·Σ_t KL_t is added after (the group std scales the scores only); no returns."""
    scores, group_ids, mask, kl, _ = rollout_tensors(8)
    settings = EstimatorSettings(estimator, kl_in_reward=kl_in_reward)
    got = estimate_advantages(
        settings, scores=scores, kl=kl, mask=mask, beta=0.3, group_ids=group_ids, values=None,
        reduce_sum=lambda t: t,
    )  # fmt: skip
    sequence_scores = [
        float(scores[i]) - (0.3 * float(kl[i].sum()) if kl_in_reward else 0.0) for i in range(9)
    ]
    for i in range(9):
        group = [sequence_scores[j] for j in members(group_ids, i)]
        mean = statistics.fmean(group)
        raw = [float(scores[j]) for j in members(group_ids, i)]
        penalty = float(scores[i]) - sequence_scores[i]
        expected = {
            "grpo": (float(scores[i]) - statistics.fmean(raw)) / (statistics.stdev(raw) + 1e-6) - penalty,
            "dr_grpo": sequence_scores[i] - mean,
            "rloo": sequence_scores[i] - (sum(group) - sequence_scores[i]) / (len(group) - 1),
        }[estimator]
        row = got.advantages[i][mask[i].bool()]
        assert torch.allclose(row, torch.full_like(row, expected), atol=1e-5)
    assert got.returns is None and (got.advantages[~mask.bool()] == 0).all()


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_estimate_advantages_reinforce_pp_matches_a_loop(estimator):
    """Token rewards −β·KL_t plus the (group-centred) score at the last token, reward-to-go with γ, then
    whitened over every response token (here: of three simulated processes)."""
    scores, group_ids, mask, kl, _ = rollout_tensors(9)
    order = torch.argsort(group_ids, stable=True)  # each simulated process holds whole groups, as in the loop
    scores, group_ids, mask, kl = scores[order], group_ids[order], mask[order], kl[order]
    beta, gamma = 0.2, 0.9
    centred = group_centred_scores(scores, group_ids) if estimator == "reinforce_pp_baseline" else scores
    returns = torch.zeros_like(mask)
    for i in range(9):
        n = int(mask[i].sum())
        rewards = [-beta * float(kl[i, t]) + (float(centred[i]) if t == n - 1 else 0.0) for t in range(n)]
        for t in range(n):
            returns[i, t] = sum(gamma ** (s - t) * rewards[s] for s in range(t, n))
    expected = masked_whiten(returns.double(), mask.double()) * mask.double()
    settings = EstimatorSettings(estimator, gamma=gamma)
    reduce = ThreadAllReduce(3)
    out: list[torch.Tensor | None] = [None] * 3

    def run(rank: int) -> None:
        rows = slice(3 * rank, 3 * rank + 3)
        out[rank] = estimate_advantages(
            settings, scores=scores[rows], kl=kl[rows], mask=mask[rows], beta=beta, group_ids=group_ids[rows],
            values=None, reduce_sum=reduce.for_rank(rank),
        ).advantages  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(out).double(), expected, atol=1e-5)


def test_kl_loss_is_the_masked_mean_of_k3_and_pulls_towards_the_reference():
    gen = torch.Generator().manual_seed(10)
    logprobs = (torch.randn(3, 5, generator=gen) - 2).requires_grad_(True)
    ref = torch.randn(3, 5, generator=gen) - 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    diff = (ref - logprobs).detach()
    terms = [
        math.exp(float(diff[b, t])) - float(diff[b, t]) - 1
        for b in range(3) for t in range(5) if mask[b, t]
    ]  # fmt: skip
    loss = kl_loss(logprobs, ref, mask)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5) and loss.item() > 0
    loss.backward()
    # d/dx [e^{r−x} − (r − x) − 1] = 1 − e^{r−x}: positive where the policy is above the reference
    expected = (1 - torch.exp(ref - logprobs.detach())) * mask / mask.sum()
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)
    assert float(kl_loss(ref, ref, mask)) == 0.0
    # a pad token's log-prob after EOS below float32's exp range, the reference masked to 0 there: finite
    past_eos = logprobs.detach().clone()
    past_eos[0, 3] = -120.0
    past_eos[0, 4] = float("-inf")  # a -inf times a 0 mask would be NaN too
    past_eos.requires_grad_(True)
    loss = kl_loss(past_eos, ref * mask, mask)
    loss.backward()
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert torch.isfinite(past_eos.grad).all() and (past_eos.grad[0, 3:] == 0).all()


def test_rollout_buffer_keeps_what_it_holds_through_a_checkpoint():
    """Optional per-token tensors (critic, --use_kl_loss) and the group ids survive tensors()/from_tensors();
    a buffer from before groups existed gets one group per response."""
    n, r = 4, 3
    seqs = SequenceBatch(torch.arange(n * 5).reshape(n, 5), torch.ones(n, 5, dtype=torch.long), 2)
    per_token = torch.randn(n, r)
    buffer = RolloutBuffer(
        seqs, per_token, per_token + 1, torch.stack([torch.randperm(n)]), 2, torch.tensor([5, 5, 6, 6]),
        ref_logprobs=per_token - 1, cursor=1,
    )  # fmt: skip
    saved = buffer.tensors()
    assert "old_values" not in saved and "returns" not in saved
    back = RolloutBuffer.from_tensors(saved)
    assert back.old_values is None and back.returns is None and back.cursor == 1
    assert torch.equal(back.ref_logprobs, per_token - 1) and back.group_ids.tolist() == [5, 5, 6, 6]
    _, mini = back.mini_batch(1)
    assert set(mini) == {"old_logprobs", "advantages", "ref_logprobs"}
    legacy = {k: v for k, v in saved.items() if k not in ("group_ids", "ref_logprobs")}
    assert RolloutBuffer.from_tensors(legacy).group_ids.tolist() == [0, 1, 2, 3]


def test_grpo_on_a_group_that_scored_alike_keeps_the_kl_term_at_its_size():
    """Four responses with the same score: their advantages are −β·Σ_t KL_t (small), not KL noise divided
    by a zero spread (unit size whatever β)."""
    scores, group_ids = torch.ones(4), torch.zeros(4, dtype=torch.long)
    mask = torch.ones(4, 3)
    kl = torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.0, 0.1], [0.2, 0.0, 0.0], [0.05, 0.05, 0.0]])
    got = estimate_advantages(
        EstimatorSettings("grpo"), scores=scores, kl=kl, mask=mask, beta=0.02, group_ids=group_ids,
        values=None, reduce_sum=lambda t: t,
    )  # fmt: skip
    expected = -0.02 * kl.sum(1, keepdim=True).expand(4, 3)
    torch.testing.assert_close(got.advantages, expected)


def test_zero_std_group_fraction_counts_groups_not_responses():
    from rlhf.ppo.estimators import zero_std_group_fraction

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0])  # groups of 2, 2 and 3: the 1st and 3rd alike
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assert float(zero_std_group_fraction(scores, group_ids)) == pytest.approx(2 / 3)
