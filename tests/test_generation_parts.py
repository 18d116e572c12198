"""The engine's pure parts against references: sampling filters, the sampler, masks, grouped attention,
batch buckets, stop tracking and the weight guard."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import rlhf.generation.attention as attention_module
from rlhf.generation import SamplingConfig
from rlhf.generation.attention import grouped_attention
from rlhf.generation.cache import attention_bias
from rlhf.generation.engine import StopTracker, prompt_positions
from rlhf.generation.graphs import StaleGraphError, WeightGuard, batch_buckets, bucket_for
from rlhf.generation.sampling import draw, filter_top_k, filter_top_p, sample_next


@pytest.mark.parametrize("top_k", [1, 3, 50])
def test_top_k_matches_hf_warper(top_k):
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(top_k))
    scores[0, :5] = 2.0  # ties at the k-th value stay, as in HF
    expected = TopKLogitsWarper(top_k)(None, scores.clone())
    assert torch.equal(filter_top_k(scores.clone(), top_k), expected)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_hf_warper(top_p):
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 2
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(filter_top_p(scores.clone(), top_p), expected)
    assert torch.equal(filter_top_p(scores, 1.0), scores)


def test_draw_samples_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    tokens = draw(probs.expand(40000, 4).clone(), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[3] == 0


def test_sample_next_greedy_suppresses_eos_until_min_new_tokens():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 1.0, 0.0]])
    sampling = SamplingConfig(max_new_tokens=8, min_new_tokens=2, temperature=0.0, eos_token_id=2)
    tokens, logprobs = sample_next(logits, 1, sampling)
    assert tokens.tolist() == [3, 0]  # EOS (2) is row 0's argmax but suppressed at step 1
    expected = torch.log_softmax(logits, -1)[[0, 1], [3, 0]]  # log-probs before the suppression
    torch.testing.assert_close(logprobs, expected)
    assert sample_next(logits, 2, sampling)[0].tolist() == [2, 0]


def test_sample_next_logprobs_are_before_top_k_at_the_temperature():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.5, top_k=2)
    tokens, logprobs = sample_next(logits, 0, sampling, torch.Generator().manual_seed(3))
    assert (tokens[:, None] == logits.topk(2, -1).indices).any(-1).all()
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)


def test_sample_next_draws_from_hf_generates_distribution():
    """EOS suppressed before min_new_tokens, then temperature, top-k and top-p, in HF generate's order:
    the tokens drawn over many rows have exactly the support of HF's processor chain and its frequencies
    (a filter applied before the temperature, or a nucleus cut too short, shows)."""
    logits = torch.randn(1, 24, generator=torch.Generator().manual_seed(4)) * 3
    eos = int(logits.argmax())  # the likeliest token is the suppressed one
    sampling = SamplingConfig(
        max_new_tokens=8, min_new_tokens=2, temperature=1.7, top_k=9, top_p=0.8, eos_token_id=eos
    )
    prompt = torch.zeros(1, 3, dtype=torch.long)  # HF counts new tokens from the prompt length
    expected = logits.clone()
    for process in (
        MinNewTokensLengthLogitsProcessor(3, 2, eos), TemperatureLogitsWarper(1.7), TopKLogitsWarper(9),
        TopPLogitsWarper(0.8),
    ):  # fmt: skip
        expected = process(prompt, expected)
    expected = expected.softmax(-1)[0]
    rows = 40000
    tokens, _ = sample_next(logits.expand(rows, -1).clone(), 0, sampling, torch.Generator().manual_seed(5))
    freq = torch.bincount(tokens, minlength=24).float() / rows
    assert torch.equal(freq > 0, expected > 0) and 2 < int((expected > 0).sum()) < 9  # both filters cut
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def bias_reference(key_pos, query_pos, query_slots, window, n_rep):
    """Loop over rows, queries and keys; rows ordered (head in group, query)."""
    batch, slots = key_pos.shape
    n_new = query_pos.shape[1]
    out = torch.full((batch, 1, n_rep * n_new, slots), float("-inf"))
    for b in range(batch):
        for t in range(n_new):
            for s in range(slots):
                k, q = int(key_pos[b, s]), int(query_pos[b, t])
                ok = 0 <= k <= q and (window is None or q - k < window)
                if ok or s == int(query_slots[t]):
                    for r in range(n_rep):
                        out[b, 0, r * n_new + t, s] = 0.0
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_attention_bias_matches_a_loop(window):
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    key_pos = torch.full((3, 10), -1)
    key_pos[:, :6] = prompt_positions(mask)
    query_pos, slots = key_pos[:, 2:6], torch.arange(2, 6)  # a prefill chunk of 4 columns
    got = attention_bias(key_pos, query_pos, slots, window, 2, torch.float32)
    assert torch.equal(got, bias_reference(key_pos, query_pos, slots, window, 2))
    assert prompt_positions(mask)[0].tolist() == [-1, -1, 0, 1, 2, 3]


def test_grouped_attention_matches_repeated_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, 3, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8),
    )
    allowed = torch.rand(2, 3, 5, generator=g) > 0.4
    allowed[..., 0] = True
    n_rep = 3
    bias = torch.zeros(2, 3, 5).masked_fill(~allowed, float("-inf"))
    folded = bias[:, None, None].expand(2, 1, n_rep, 3, 5).reshape(2, 1, n_rep * 3, 5)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), attn_mask=allowed[:, None]
    )
    torch.testing.assert_close(grouped_attention(q, k, v, folded), expected, atol=1e-6, rtol=1e-5)

    # CUDA's memory-efficient kernel returns [B, H, T, hd] laid out as [B, T, H, hd] (non-contiguous); a
    # .view of that failed on an H200. The same layout on CPU:
    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    with patch.object(attention_module.F, "scaled_dot_product_attention", strided_sdpa):
        torch.testing.assert_close(grouped_attention(q, k, v, folded), expected, atol=1e-6, rtol=1e-5)


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert [bucket_for(n, batch_buckets(40)) for n in (1, 3, 9, 33, 40)] == [1, 4, 16, 40, 40]


def test_stop_tracker_finds_the_first_length_and_skips_rows_ended_earlier():
    calls = []

    def stop(row, tokens):
        calls.append((row, len(tokens)))
        return 7 in tokens

    tracker = StopTracker(stop, eos_token_id=2, offset=10)
    done = torch.tensor([False, False, True, True])  # rows 2 and 3 produced their EOS
    tokens = torch.tensor([[5, 7, 5, 5], [5, 5, 5, 5], [5, 2, 7, 7], [2, 7, 9, 9]])
    tracker.check(tokens, done)
    assert tracker.ends == {0: 2} and done.tolist() == [True, False, True, True]
    # rows 2 and 3 ended at their EOS before any 7: asked once with the tokens before it, not ended by stop
    assert (12, 1) in calls and (13, 0) in calls and 2 not in tracker.ends
    calls.clear()
    tracker.check(torch.cat([tokens, torch.tensor([[5], [7], [5], [5]])], 1), done)
    assert tracker.ends == {0: 2, 1: 5} and {row for row, _ in calls} == {11}  # rows 0, 2, 3 not asked again


def test_weight_guard_sees_reallocated_tensors_not_in_place_updates():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    guard = WeightGuard(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # in place: fine
    guard.check()
    model[1].bias.data = model[1].bias.data.clone()
    with pytest.raises(StaleGraphError, match="1.bias"):
        guard.check()


@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_fused_rms_norm_leaves_autocast_only_where_its_dtypes_agree(dtypes):
    """CUDA autocast runs ``rms_norm`` in float32 (three extra kernels per norm for the same once-rounded
    result), so the merged decoder's norm runs outside autocast when ``x`` and the weight share a dtype; with
    mixed dtypes autocast picks the dtype, as for the module. Values as the Hugging Face module's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlhf.generation.merged_decoder import FusedRMSNorm

    x_dtype, weight_dtype = dtypes
    module = LlamaRMSNorm(16, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16).to(x_dtype)
    seen, rms_norm = [], F.rms_norm

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return rms_norm(*args, **kwargs)

    with patch.object(F, "rms_norm", recording), torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedRMSNorm(module)(x)
        expected = module(x)
    assert seen == [x_dtype != weight_dtype]
    torch.testing.assert_close(
        out.float(), expected.float(), rtol=1e-2 if torch.bfloat16 in dtypes else 1e-6, atol=1e-2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_hugging_face(dtype):
    """Three kernels (a product, a roll, an addcmul) for Hugging Face's rotate-half RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from rlhf.models.rope import apply_rope, signed_sin

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=gen).to(dtype), torch.randn(2, 2, 3, 8, generator=gen).to(dtype)
    angles = torch.rand(2, 3, 4, generator=gen) * 6
    cos, sin = (
        torch.cat((angles, angles), -1).cos().to(dtype),
        torch.cat((angles, angles), -1).sin().to(dtype),
    )
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(apply_rope(q, cos, signed_sin(sin)), expected_q, **tolerance)
    torch.testing.assert_close(apply_rope(k, cos, signed_sin(sin)), expected_k, **tolerance)
