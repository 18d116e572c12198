"""Packed attention: boundaries from positions, each backend against a dense reference, packed loss and
gradients equal padded ones, isolation, and the dense fallback for batches that are not packed."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.errors import ConfigError
from rlhf.reward import PairCollator, pairwise_loss, sequence_rewards
from rlhf.reward.packing import PackedPairCollator, packed_sequence_rewards
from rlhf.sft.batching import PaddedCollator, packed_collator
from rlhf.training.packed_attention import (
    KERNELS,
    PREFIX,
    backend_available,
    causal_mask,
    choose_backend,
    cu_seqlens_from_position_ids,
    document_ids,
    packed_attention_forward,
    use_packed_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# backends whose forward and backward run on this machine
TRAINABLE = [name for name in KERNELS if backend_available(name, DEVICE)]
# FlexAttention also runs forward-only on CPU (PyTorch has no CPU backward for it)
FORWARD_ONLY = ["flex"] if DEVICE == "cpu" else []


def test_boundaries_and_document_ids_from_restarting_positions():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9]
    assert document_ids(cu, 9).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert cu_seqlens_from_position_ids(torch.arange(4)).tolist() == [0, 4]


def test_causal_mask_with_window_and_left_padding():
    mask = causal_mask(4, torch.device("cpu"), window=2)[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    padded = causal_mask(3, torch.device("cpu"), key_mask=torch.tensor([[0, 1, 1]]))[0, 0].int()
    # the pad query sees every key (no NaN); real queries see real keys up to themselves
    assert padded.tolist() == [[1, 1, 1], [0, 1, 0], [0, 1, 1]]


def test_backend_choice():
    assert choose_backend("auto", "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="--packed_attention must be one of"):
        choose_backend("xformers", "cpu")
    with pytest.raises(ConfigError, match="not available on cpu"):
        choose_backend("varlen", "cpu")


def test_a_float32_run_never_gets_a_flashattention_kernel(monkeypatch):
    """FlashAttention kernels take float16/bfloat16 only: a float32 run without --bf16/--fp16 used to be
    logged as `varlen` while every layer quietly ran sdpa."""
    from rlhf.training import packed_attention

    monkeypatch.setattr(packed_attention, "backend_available", lambda name, device: True)
    assert choose_backend("auto", "cuda", half_precision=True) == "varlen"
    assert choose_backend("auto", "cuda", half_precision=False) == "flex"
    assert choose_backend("flex", "cuda", half_precision=False) == "flex"
    for name in ("varlen", "flash_attn"):
        with pytest.raises(
            ConfigError, match=f"--packed_attention {name} runs float16/bfloat16 only: add --bf16"
        ):
            choose_backend(name, "cuda", half_precision=False)


def _dense_document_reference(q, k, v, cu, window):
    """Masked SDPA over the whole row with an explicit document-causal mask. q (T, Hq, D), k/v (T, Hkv, D)."""
    total, n_rep = q.shape[0], q.shape[1] // k.shape[1]
    doc = document_ids(cu, total)
    mask = causal_mask(total, q.device, window)[0, 0] & (doc[:, None] == doc[None, :])
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask)
    return out.transpose(0, 1)


@pytest.mark.parametrize("backend", TRAINABLE + FORWARD_ONLY)
@pytest.mark.parametrize("window", [None, 3])
def test_kernel_matches_a_dense_document_mask(backend, window):
    if backend == "varlen" and window is not None:
        pytest.importorskip("torch.nn.attention.varlen")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if backend in ("varlen", "flash_attn") else torch.float32
    q = torch.randn(11, 4, 16, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(11, 2, 16, device=DEVICE, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, 5, 6, 11], dtype=torch.int32, device=DEVICE)
    out = KERNELS[backend](q, k, v, cu, 5, None, window)
    expected = _dense_document_reference(q.float(), k.float(), v.float(), cu, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def _examples(lengths, prompt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 500, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model(path, **config):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    for key, value in config.items():
        setattr(model.config, key, value)
    return model.to(DEVICE)


def _on_device(batch):
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**_on_device(batch)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", TRAINABLE)
@pytest.mark.parametrize(("arch", "config"), [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_packed_loss_and_gradients_equal_padded(tiny_model_factory, backend, arch, config):
    """fp32: one packed row of three documents gives the padded batch's loss and gradients.

    Mistral's sliding window (6) is shorter than two of the documents, so the window is exercised too."""
    examples = _examples([9, 4, 12])
    model = _model(tiny_model_factory(arch), **config)
    padded_loss, padded_grads = _loss_and_grads(model, PaddedCollator(pad_token_id=0)(examples))
    name = use_packed_attention(model, backend)
    packed_loss, packed_grads = _loss_and_grads(model, packed_collator(name)(examples))
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for param, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[param], grad, atol=1e-5, rtol=1e-4, msg=param)


@pytest.mark.parametrize("backend", FORWARD_ONLY)
def test_packed_loss_equals_padded_forward_only(tiny_llama, backend):
    examples = _examples([9, 4, 12])
    model = _model(tiny_llama)
    name = PREFIX + backend  # registered by hand: use_packed_attention refuses what cannot train here
    AttentionInterface.register(name, functools.partial(packed_attention_forward, backend=backend))
    with torch.no_grad():
        padded = model(**_on_device(PaddedCollator(pad_token_id=0)(examples))).loss
        model.set_attn_implementation(name)
        packed = model(**_on_device(packed_collator(name)(examples))).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_boundaries_from_position_ids_alone_isolate_documents(tiny_llama):
    """Without the collator's cu_seq_lens the documents are found from the restarting positions."""
    examples = _examples([7, 5, 8], seed=1)
    model = _model(tiny_llama)
    use_packed_attention(model, "sdpa")
    packed = packed_collator("sdpa")(examples)
    assert "cu_seq_lens_q" not in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        offset = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[offset : offset + len(alone)], alone, atol=1e-5, rtol=1e-5)
            offset += len(alone)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_fall_back_to_masked_sdpa(tiny_llama, padding_side):
    """A model set to packed attention still handles padded batches (its logits on real tokens equal SDPA's)."""
    examples = _examples([6, 9])
    width = 9
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, span], mask[i, span] = torch.tensor(ex["input_ids"]), 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    model = _model(tiny_llama)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        use_packed_attention(model, "sdpa")
        got = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_saved_model_keeps_its_default_attention(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    use_packed_attention(model, "sdpa")
    model.save_pretrained(tmp_path)
    assert "rlhf_packed" not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.config._attn_implementation.startswith("rlhf_packed")


@pytest.mark.parametrize("backend", TRAINABLE)
def test_packed_reward_pairs_equal_padded_pairs(tiny_llama, backend):
    """The 2B sides of B pairs in one packed row: same rewards, pairwise loss and gradients as padded."""
    gen = torch.Generator().manual_seed(2)

    def side(n):
        return torch.randint(4, 500, (n,), generator=gen).tolist()

    pairs = [
        {"chosen_ids": side(8), "rejected_ids": side(5), "margin": 0.5},
        {"chosen_ids": side(3), "rejected_ids": side(11), "margin": 0.0},
    ]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).to(DEVICE)
    model.config.pad_token_id = 0

    def loss_and_grads(rewards, margin):
        model.zero_grad()
        chosen, rejected = rewards.chunk(2)
        loss = pairwise_loss(chosen, rejected, margin.to(DEVICE))
        loss.backward()
        return rewards.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = _on_device(PairCollator(pad_token_id=0)(pairs))
    expected = loss_and_grads(
        sequence_rewards(model, padded["input_ids"], padded["attention_mask"]), padded["margin"]
    )
    use_packed_attention(model, backend)
    packed = _on_device(PackedPairCollator()(pairs))
    assert packed["input_ids"].shape == (1, 27) and packed["cu_seq_lens_q"].tolist() == [0, 8, 11, 16, 27]
    assert packed["position_ids"][0].tolist() == [*range(8), *range(3), *range(5), *range(11)]  # per side
    got = loss_and_grads(packed_sequence_rewards(model, packed), packed["margin"])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _fake_varlen(api: str):
    """A stand-in for torch's varlen_attn (CUDA-only) with the keyword set of torch 2.10 or 2.11+,
    computed densely, so the wrapper's argument handling runs on CPU."""

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, left):
        assert q.dtype in (torch.float16, torch.bfloat16) and cu_q.dtype == torch.int32
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        window = None if left < 0 else left + 1
        return _dense_document_reference(q.float(), k.float(), v.float(), cu_q, window).to(q.dtype)

    if api == "2.10":

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None
        ):
            assert is_causal and key.shape[1] == query.shape[1]  # no GQA in this API: heads were repeated
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, -1)
    else:

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False,
        ):  # fmt: skip
            assert window_size[1] == 0 and enable_gqa == (key.shape[1] != query.shape[1])
            assert scale == pytest.approx(query.shape[-1] ** -0.5)
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size[0])

    return varlen_attn


@pytest.mark.parametrize(("api", "window"), [("2.10", None), ("2.11", None), ("2.11", 3)])
def test_varlen_wrapper_handles_each_torch_api(monkeypatch, api, window):
    import rlhf.training.packed_attention as packed

    fake = _fake_varlen(api)
    signature_params = frozenset(inspect.signature(fake).parameters)
    causal = {"is_causal": True} if api == "2.10" else {"window_size": (-1, 0)}
    monkeypatch.setattr(packed, "_varlen_api", lambda: (fake, causal, signature_params))
    torch.manual_seed(0)
    query = torch.randn(1, 4, 11, 16)  # (B, Hq, T, D) float32, as a model without autocast would give
    key, value = torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    cu = torch.tensor([0, 5, 6, 11], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, max_length_q=5, sliding_window=window, scaling=16**-0.5)
    expected = _dense_document_reference(*(x[0].transpose(0, 1) for x in (query, key, value)), cu, window)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 q/k/v under autocast: cast to its dtype
        out, _ = packed_attention_forward(None, query, key, value, None, backend="varlen", **kwargs)
    assert out.shape == (1, 11, 4, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0].float(), expected, atol=3e-2, rtol=3e-2)
    # without autocast a float32 row cannot go to FlashAttention kernels: exact per-document SDPA instead
    out, _ = packed_attention_forward(None, query, key, value, None, backend="varlen", **kwargs)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    if api == "2.10":
        with pytest.raises(ConfigError, match="sliding-window"), torch.autocast("cpu", dtype=torch.bfloat16):
            packed_attention_forward(
                None, query, key, value, None, backend="varlen", **{**kwargs, "sliding_window": 3}
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-kernel backends need a GPU")
@pytest.mark.parametrize(
    "backend", [b for b in ("varlen", "flash_attn", "flex") if backend_available(b, "cuda")]
)
def test_packed_bf16_training_step_matches_padded_on_gpu(tiny_llama, backend):
    """bf16 weights on the GPU kernels: loss within bf16 noise and gradients pointing the same way."""
    examples = _examples([300, 41, 480])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).to("cuda")
    model.config.use_cache = False
    padded_loss, padded_grads = _loss_and_grads(model, PaddedCollator(pad_token_id=0)(examples))
    name = use_packed_attention(model, backend)
    packed_loss, packed_grads = _loss_and_grads(model, packed_collator(name)(examples))
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=2e-2)
    for param, grad in padded_grads.items():
        cosine = F.cosine_similarity(packed_grads[param].float().flatten(), grad.float().flatten(), dim=0)
        assert cosine > 0.98, param


def test_what_packed_attention_refuses(tiny_llama):
    """Attention dropout is refused up front; a KV-cache (generation) forward is refused, not silently wrong."""
    model = _model(tiny_llama, attention_dropout=0.1)
    with pytest.raises(ConfigError, match="attention_dropout 0.1"):
        use_packed_attention(model, "sdpa")
    model = _model(tiny_llama)
    use_packed_attention(model, "sdpa")
    with pytest.raises(ConfigError, match="training forwards"):
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_mixed_dtypes_under_autocast_reach_the_kernel_as_one(monkeypatch, backend):
    """float32 master weights under --bf16: RoPE hands over float32 q/k and a bf16 v; every backend gets
    all three in autocast's dtype (flex and older torch reject mixed dtypes)."""
    seen = []

    def kernel(q, k, v, cu_seqlens, max_len, scale, window):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q

    monkeypatch.setitem(KERNELS, backend, kernel)
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8, dtype=torch.bfloat16)
    kwargs = {"cu_seq_lens_q": torch.tensor([0, 2, 6], dtype=torch.int32), "max_length_q": 4}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_attention_forward(None, q, k, v, None, backend=backend, **kwargs)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
