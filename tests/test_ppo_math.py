"""PPO math against loop-based or hand-computed references on random inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.ppo.advantages import gae_advantages
from rlhf.ppo.kl import AdaptiveKLController, kl_estimate, kl_shaped_rewards
from rlhf.ppo.losses import aggregate_tokens, entropy_bonus, policy_loss, pretrain_weight, value_loss
from rlhf.ppo.metrics import MetricsAccumulator
from rlhf.ppo.stats import (
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)


def random_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded masks with lengths in [1, length]."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return (torch.arange(length)[None, :] < lengths[:, None]).float()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def masked_entries(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [x[i, j].item() for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i, j] > 0]


def test_masked_mean_var_whiten_match_python(gen):
    x, mask = torch.randn(5, 7, generator=gen), random_mask(5, 7, gen)
    vals = masked_entries(x, mask)
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-5)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-5)
    row_means = masked_mean(x, mask, dim=1)
    for i in range(5):
        row = [x[i, j].item() for j in range(7) if mask[i, j] > 0]
        assert row_means[i].item() == pytest.approx(sum(row) / len(row), rel=1e-5)
    white = masked_whiten(x, mask)
    white_vals = masked_entries(white, mask)
    for v, w in zip(vals, white_vals):
        assert w == pytest.approx((v - mean) / math.sqrt(var + 1e-8), rel=1e-4, abs=1e-5)
    kept = masked_whiten(x, mask, shift_mean=False)  # scaled to unit variance, the mean put back
    for v, w in zip(vals, masked_entries(kept, mask)):
        assert w == pytest.approx((v - mean) / math.sqrt(var + 1e-8) + mean, rel=1e-4, abs=1e-5)


def test_logprobs_and_entropy_use_temperature(gen):
    logits, tokens = torch.randn(3, 4, 11, generator=gen), torch.randint(0, 11, (3, 4), generator=gen)
    temperature = 0.7
    out, ent = logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)
    for b in range(3):
        for t in range(4):
            z = [v / temperature for v in logits[b, t].tolist()]
            log_norm = math.log(sum(math.exp(v) for v in z))
            assert out[b, t].item() == pytest.approx(z[tokens[b, t]] - log_norm, abs=1e-5)
            probs = [math.exp(v - log_norm) for v in z]
            assert ent[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    r = [0.5, -1.0]  # log π - log π_ref
    assert kl_estimate(logp, ref, "k1").tolist() == [[pytest.approx(v) for v in r]]
    assert kl_estimate(logp, ref, "abs").tolist() == [[pytest.approx(abs(v)) for v in r]]
    assert kl_estimate(logp, ref, "mse").tolist() == [[pytest.approx(0.5 * v * v) for v in r]]
    k3 = [math.exp(-v) - 1 + v for v in r]
    assert kl_estimate(logp, ref, "k3").tolist() == [[pytest.approx(v, rel=1e-6) for v in k3]]
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_k1_and_k3_are_unbiased_kl_estimates(gen):
    p, q = torch.softmax(torch.randn(6, generator=gen), 0), torch.softmax(torch.randn(6, generator=gen), 0)
    exact = (p * (p.log() - q.log())).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[samples][None], q.log()[samples][None]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_kl_shaped_rewards_loop_reference(gen):
    kl, mask = torch.randn(4, 6, generator=gen), random_mask(4, 6, gen)
    scores, beta = torch.randn(4, generator=gen), 0.05
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, beta)
    for b in range(4):
        last = int(mask[b].sum().item()) - 1
        for t in range(6):
            expected = -beta * kl[b, t].item() if mask[b, t] > 0 else 0.0
            assert non_score[b, t].item() == pytest.approx(expected, abs=1e-6)
            if t == last:
                expected += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_gae_matches_loop_reference(gen):
    rewards, values, mask = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), None
    mask = random_mask(3, 8, gen)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum().item())
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        for t in range(n):
            expected = 0.0
            for k in range(t, n):
                next_v = v[k + 1] if k + 1 < n else 0.0
                expected += (gamma * lam) ** (k - t) * (r[k] + gamma * next_v - v[k])
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert adv[b, n:].abs().sum().item() == 0.0 and ret[b, n:].abs().sum().item() == 0.0


def test_gae_gamma1_lam1_is_reward_to_go():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.3, 0.2, 0.1]]), torch.ones(1, 3)
    _, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert ret.tolist() == [[pytest.approx(1.0)] * 3]


def test_policy_loss_loop_reference(gen):
    logp, old = torch.randn(4, 5, generator=gen) * 0.3, torch.randn(4, 5, generator=gen) * 0.3
    adv, mask, clip = torch.randn(4, 5, generator=gen), random_mask(4, 5, gen), 0.2
    out = policy_loss(logp, old, adv, mask, clip)
    losses, clipped, kls = [], [], []
    for b in range(4):
        for t in range(5):
            if mask[b, t] == 0:
                continue
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            l1, l2 = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            losses.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            kls.append(0.5 * (logp[b, t].item() - old[b, t].item()) ** 2)
    assert out.loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert out.clipfrac.item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)
    assert out.approxkl.item() == pytest.approx(sum(kls) / len(kls), abs=1e-6)


def test_loss_aggregations_loop_reference(gen):
    """token-mean (all tokens alike), seq-mean-token-mean (GRPO: each response alike), seq-mean-token-sum-norm
    (Dr. GRPO: token sums over a constant length) against plain loops."""
    per_token, mask = torch.randn(4, 6, generator=gen, dtype=torch.float64), random_mask(4, 6, gen).double()
    rows = [[per_token[b, t].item() for t in range(6) if mask[b, t]] for b in range(4)]
    tokens = [x for row in rows for x in row]
    expected = {
        "token-mean": sum(tokens) / len(tokens),
        "seq-mean-token-mean": sum(sum(r) / max(len(r), 1) for r in rows) / 4,
        "seq-mean-token-sum-norm": sum(sum(r) for r in rows) / 4 / 6,
    }
    for mode, value in expected.items():
        assert aggregate_tokens(per_token, mask, mode, norm_length=6).item() == pytest.approx(
            value, abs=1e-12
        )
    # the policy loss aggregates its per-token terms the same way; the default is today's token mean
    logp, old, adv = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3 for _ in range(3))
    token_terms = torch.maximum(-adv * (logp - old).exp(), -adv * (logp - old).exp().clamp(0.8, 1.2))
    assert policy_loss(logp, old, adv, mask, 0.2).loss.item() == pytest.approx(
        aggregate_tokens(token_terms, mask).item(), abs=1e-12
    )
    for mode in expected:
        got = policy_loss(logp, old, adv, mask, 0.2, mode, 6).loss.item()
        assert got == pytest.approx(aggregate_tokens(token_terms, mask, mode, 6).item(), abs=1e-12)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_tokens(per_token, mask, "sum")


def test_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    out.loss.backward()
    assert logp.grad.item() == 0.0 and out.clipfrac.item() == 1.0


def test_value_loss_loop_reference(gen):
    v, old, ret = (
        torch.randn(4, 5, generator=gen),
        torch.randn(4, 5, generator=gen),
        torch.randn(4, 5, generator=gen),
    )
    mask, clip = random_mask(4, 5, gen), 0.2
    out = value_loss(v, old, ret, mask, clip)
    terms, clipped = [], []
    for b in range(4):
        for t in range(5):
            if mask[b, t] == 0:
                continue
            vc = min(max(v[b, t].item(), old[b, t].item() - clip), old[b, t].item() + clip)
            e1, e2 = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
            terms.append(0.5 * max(e1, e2))
            clipped.append(float(e2 > e1))
    assert out.loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert out.clipfrac.item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)


def clip_is_active_and_larger(x, lo, hi, loss_of) -> float:
    """1.0 when ``x`` lies outside [lo, hi] and the loss at the clipped point exceeds the loss at ``x``."""
    if lo <= x <= hi:
        return 0.0
    clipped = lo if x < lo else hi
    return float(loss_of(clipped) > loss_of(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clipfracs_count_only_tokens_where_the_clip_is_active_and_larger(dtype):
    """On many random tokens, most inside the clip band: a clip fraction equals the share of tokens where
    the clip is active and makes the loss larger. Tokens inside the band count 0 (the clipped value must be
    the unclipped one bit for bit, which V_old + clamp(V - V_old, -ε, ε) is not)."""
    gen = torch.Generator().manual_seed(1)
    shape, clip = (64, 96), 0.2
    mask = random_mask(*shape, gen).to(dtype)
    old = torch.randn(shape, generator=gen, dtype=dtype)
    v = old + 0.2 * torch.randn(shape, generator=gen, dtype=dtype)
    ret = torch.randn(shape, generator=gen, dtype=dtype)
    logp_old = torch.randn(shape, generator=gen, dtype=dtype)
    logp = logp_old + 0.2 * torch.randn(shape, generator=gen, dtype=dtype)
    adv = torch.randn(shape, generator=gen, dtype=dtype)
    ratio = torch.exp(logp - logp_old)  # the band edges below are rounded to the inputs' dtype too
    value_lo, value_hi = (old - clip).tolist(), (old + clip).tolist()
    ratio_lo, ratio_hi = (
        torch.tensor(1 - clip, dtype=dtype).item(),
        torch.tensor(1 + clip, dtype=dtype).item(),
    )
    value_hits, policy_hits, inside = [], [], 0
    for b in range(shape[0]):
        for t in range(shape[1]):
            if mask[b, t] == 0:
                continue
            x, r = v[b, t].item(), ret[b, t].item()
            value_hits.append(
                clip_is_active_and_larger(x, value_lo[b][t], value_hi[b][t], lambda y, r=r: abs(y - r))
            )
            inside += value_lo[b][t] <= x <= value_hi[b][t]
            a = adv[b, t].item()
            policy_hits.append(
                clip_is_active_and_larger(ratio[b, t].item(), ratio_lo, ratio_hi, lambda y, a=a: -a * y)
            )
    assert inside > len(value_hits) / 2  # the case that rounding noise used to miscount
    assert sum(value_hits) > 0 and sum(policy_hits) > 0
    value = value_loss(v, old, ret, mask, clip)
    policy = policy_loss(logp, logp_old, adv, mask, clip)
    one_token = 1 / len(value_hits)  # a fraction off by less than a tenth of one token is the same count
    assert value.clipfrac.item() == pytest.approx(sum(value_hits) / len(value_hits), abs=0.1 * one_token)
    assert policy.clipfrac.item() == pytest.approx(sum(policy_hits) / len(policy_hits), abs=0.1 * one_token)


def test_entropy_explained_variance_and_pretrain_weight(gen):
    ent, mask = torch.rand(3, 4, generator=gen), random_mask(3, 4, gen)
    assert entropy_bonus(ent, mask).item() == pytest.approx(masked_mean(ent, mask).item())
    targets = torch.randn(3, 4, generator=gen)
    assert explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    mean_pred = torch.full_like(targets, masked_mean(targets, mask).item())
    assert explained_variance(mean_pred, targets, mask).item() == pytest.approx(0.0, abs=1e-5)
    # random predictions against numpy's residual variance over the masked entries; an offset costs nothing
    preds, keep = torch.randn(3, 4, generator=gen), mask.bool().numpy()
    t, p = targets.numpy()[keep], preds.numpy()[keep]
    assert explained_variance(preds, targets, mask).item() == pytest.approx(
        1 - np.var(t - p) / np.var(t), rel=1e-5
    )
    assert explained_variance(targets + 0.7, targets, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert [pretrain_weight(s, 0.1, 500) for s in (0, 250, 500, 900)] == pytest.approx([0, 0.05, 0.1, 0.1])
    assert pretrain_weight(0, 0.1, 0) == 0.1


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl2.update(5.4, 100)  # error -0.1
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))


def test_a_kl_horizon_that_could_flip_the_sign_of_beta_is_refused():
    """At n / horizon >= 5 a low KL multiplies β by 1 - 0.2·n/horizon <= 0: the penalty would become a bonus."""
    from rlhf.ppo.config import PPOArguments
    from rlhf.ppo.session import build_kl_controller

    ppo = PPOArguments(kl_penalty_beta=0.1, target_kl=6.0, kl_horizon=0.1)
    with pytest.raises(ConfigError, match=r"--kl_horizon 0.1: .* n = 64 samples.* Give --kl_horizon > 12.8"):
        build_kl_controller(ppo, samples_per_rollout=64)
    ppo.kl_horizon = 12.9  # just above: β stays positive however low the KL
    ctl = build_kl_controller(ppo, samples_per_rollout=64)
    for _ in range(50):
        ctl.update(0.0, 64)
    assert 0 < ctl.value < 0.1
    fixed = build_kl_controller(PPOArguments(kl_horizon=0.1), samples_per_rollout=64)  # no --target_kl
    assert fixed.value == 0.02


def test_metrics_file_resume_drops_later_rows_and_a_row_cut_short(tmp_path, caplog):
    """A kill while writing a row leaves it cut short (its step's checkpoint was never published): resuming
    drops it with a warning naming the line, keeps the rows up to the checkpoint, and appends after them."""
    import logging

    from rlhf.ppo.metrics import MetricsFile

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 0.5, "name": "a\u2028b"}, ensure_ascii=False) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n" + rows[2][:-9])
    with caplog.at_level(logging.WARNING):
        MetricsFile(path).truncate_after(2)
    assert f"{path}:4: not a whole metrics row" in caplog.text
    MetricsFile(path).append({"step": 3, "loss": float("nan")})
    assert [json.loads(line)["step"] for line in path.read_text().split("\n") if line] == [1, 2, 3]
    assert json.loads(path.read_text().split("\n")[2])["loss"] is None


def test_metrics_rows_weight_rollout_statistics_by_the_mini_batches_trained_on_them():
    acc = MetricsAccumulator()
    acc.start_rollout({"reward/score": 0.1, "objective/kl": 3.0}, seconds=6.0, mini_batches=3)
    for loss in (1.0, 2.0):
        acc.add_mini_batch({"loss/policy": loss})
    means = acc.means()
    assert means["reward/score"] == 0.1 and means["objective/kl"] == 3.0  # one rollout: bit for bit
    assert means["loss/policy"] == 1.5 and acc.values["time/rollout_s"] == [2.0, 2.0]
    acc.reset()  # a new window in the middle of the rollout: its statistics stay
    acc.add_mini_batch({"loss/policy": 3.0})
    acc.start_rollout({"reward/score": 0.7, "objective/kl": 1.0}, seconds=1.0, mini_batches=4)
    saved = json.loads(json.dumps(acc.state()))  # what a checkpoint holds
    resumed = MetricsAccumulator()
    resumed.load_state(saved)
    for a in (acc, resumed):
        for _ in range(3):
            a.add_mini_batch({"loss/policy": 0.0})
    assert acc.means() == resumed.means()
    assert acc.means()["reward/score"] == pytest.approx(0.25 * 0.1 + 0.75 * 0.7)  # 1 + 3 mini-batches
    assert sum(acc.values["time/rollout_s"]) == pytest.approx(2.0 + 3 * 0.25)
    acc.reset()
    assert acc.means() == {} and acc.rollouts[0]["stats"]["reward/score"] == 0.7


def test_a_window_of_rollouts_with_other_statistics_averages_each_key_over_the_rollouts_that_have_it():
    """A resumed run may collect rollouts with other keys than its checkpoint's (--old_logprobs update
    reports objective/kl from the update, not the rollout): no KeyError, each key over its rollouts."""
    acc = MetricsAccumulator()
    acc.start_rollout({"reward/score": 1.0, "objective/kl": 2.0}, seconds=1.0, mini_batches=1)
    acc.add_mini_batch({"loss/policy": 0.0})
    acc.start_rollout({"reward/score": 3.0, "reward/frac_zero_std": 0.5}, seconds=1.0, mini_batches=1)
    acc.add_mini_batch({"loss/policy": 0.0})
    means = acc.means()
    assert (
        means["reward/score"] == 2.0 and means["objective/kl"] == 2.0 and means["reward/frac_zero_std"] == 0.5
    )
