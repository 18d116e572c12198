"""The rollout engine on Hugging Face models (eager on CPU) against HF ``generate`` and teacher-forced forwards.

Every model carries an active, unmerged LoRA adapter with non-zero B (so it changes the outputs), and every
batch mixes prompt lengths (left padding).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.errors import ConfigError
from rlhf.generation import SamplingConfig, response_mask_after_eos
from rlhf.generation.build import build_generator, decoder_for
from rlhf.generation.engine import EngineGenerator, RolloutEngine
from rlhf.generation.graphs import StaleGraphError
from rlhf.generation.hf import HFGenerator
from rlhf.generation.merged_decoder import FusedRMSNorm

FAMILIES = ["llama", "mistral", "mixtral", "qwen2"]
PROMPTS = ["Hi", "Tell me how you feel about cats.", "x y", "The weather today is"]
NEW = 10


def with_lora(model_dir: Path, seed: int = 0) -> torch.nn.Module:
    """The model with an active ``actor`` LoRA adapter on all linear layers, B random (not zero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(model, config, adapter_name="actor").eval()


def left_padded(model_dir: Path, prompts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def hf_greedy(model, ids, mask, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HF generate's greedy responses, right-padded after the first EOS, and their mask."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens, eos_token_id=sampling.eos_token_id,
            pad_token_id=sampling.pad_token_id,
        )  # fmt: skip
    response = out[:, ids.shape[1] :]
    response_mask = response_mask_after_eos(response, sampling.eos_token_id)
    return response.masked_fill(response_mask == 0, sampling.pad_token_id), response_mask


def teacher_forced_logits(model, ids, mask, response, response_mask) -> torch.Tensor:
    """Logits [B, R, V] that predict each response token, from one forward over prompt + response."""
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    return logits[:, ids.shape[1] - 1 : -1].float()


def engine_for(model, **options) -> RolloutEngine:
    options.setdefault("max_batch_size", 8)
    options.setdefault("max_length", 64)
    return RolloutEngine(decoder_for(model), **options)


def greedy(eos: int | None = None, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=NEW, temperature=0.0, eos_token_id=eos, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate_with_lora(family, tiny_model_factory):
    model_dir = tiny_model_factory(family)
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    engine = engine_for(model)
    # as EOS, a token that some greedy row produces first at step >= 2, so that row ends there
    first, _ = hf_greedy(model, ids, mask, greedy())
    eos = next(
        int(first[r, j])
        for j in range(2, NEW)
        for r in range(len(PROMPTS))
        if first[r, j] not in first[r, :j]
    )
    sampling = greedy(eos=eos, min_new_tokens=2)
    expected, expected_mask = hf_greedy(model, ids, mask, sampling)
    out = engine.generate(ids, mask, sampling)
    assert expected_mask.sum(1).min() < NEW  # some row did end at the EOS
    assert torch.equal(out.response_ids, expected)
    assert torch.equal(out.response_mask, expected_mask)
    with model.disable_adapter():  # the adapter mattered: the base model continues differently
        assert not torch.equal(engine.generate(ids, mask, sampling).response_ids, expected)


def test_sampled_logprobs_equal_a_teacher_forced_forward(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=2)
    out = engine_for(model).generate(ids, mask, sampling, generator=torch.Generator().manual_seed(0))
    logits = teacher_forced_logits(model, ids, mask, out.response_ids, out.response_mask)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected * out.response_mask, atol=1e-5, rtol=0)
    assert (out.logprobs[out.response_mask.bool()] < 0).all()


def test_sampling_honours_min_new_tokens_eos_top_k_and_top_p(tiny_model_factory):
    model_dir = tiny_model_factory("qwen2")
    model = with_lora(model_dir)
    with torch.no_grad():  # a sharper next-token distribution, so that sampling does produce the EOS
        model.get_output_embeddings().weight.mul_(16)
    ids, mask = left_padded(model_dir, PROMPTS * 4)
    # the most likely first token of row 0 as EOS: many rows would end right away without min_new_tokens
    eos = int(engine_for(model, max_batch_size=16).generate(ids, mask, greedy()).response_ids[0, 0])
    for top_k, top_p in [(3, 1.0), (0, 0.6)]:
        sampling = SamplingConfig(
            max_new_tokens=NEW, min_new_tokens=4, temperature=1.3, top_k=top_k, top_p=top_p, eos_token_id=eos
        )
        out = engine_for(model, max_batch_size=16).generate(ids, mask, sampling)
        lengths = out.response_mask.sum(1)
        assert (lengths >= 4).all() and (
            lengths < NEW
        ).any()  # EOS after min_new_tokens, and it does end rows
        last = out.response_ids.gather(1, (lengths - 1)[:, None]).squeeze(1)
        assert ((last == eos) | (lengths == NEW)).all()  # a row ends at its first EOS or at the limit
        assert (out.response_ids[out.response_mask == 0] == 0).all()
        logits = teacher_forced_logits(model, ids, mask, out.response_ids, out.response_mask) / 1.3
        logits[:, :4, eos] = float("-inf")  # what the sampler saw before min_new_tokens
        probs = logits.softmax(-1)
        chosen = probs.gather(-1, out.response_ids[..., None]).squeeze(-1)
        rank = (probs > chosen[..., None]).sum(-1)  # tokens more likely than the sampled one
        mass_above = (probs * (probs > chosen[..., None])).sum(-1)
        real = out.response_mask.bool()
        if top_k:
            assert (rank[real] < top_k).all()
        else:
            assert (mass_above[real] < top_p).all()  # inside the nucleus


def test_same_seed_same_tokens(tiny_model_factory):
    model_dir = tiny_model_factory("mistral")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    engine = engine_for(model)
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
    runs = [
        engine.generate(ids, mask, sampling, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)
    torch.manual_seed(5)
    a = engine.generate(ids, mask, sampling)
    torch.manual_seed(5)
    assert torch.equal(a.response_ids, engine.generate(ids, mask, sampling).response_ids)


def test_an_empty_batch_has_no_responses(tiny_model_factory):
    model = with_lora(tiny_model_factory("llama"))
    empty = torch.zeros((0, 4), dtype=torch.long)
    out = engine_for(model).generate(empty, empty, greedy())
    assert out.response_ids.shape == out.response_mask.shape == out.logprobs.shape == (0, 0)


def test_in_place_lora_update_is_seen_by_the_next_generation(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    engine = engine_for(model)
    sampling = greedy()
    before = engine.generate(ids, mask, sampling)
    with torch.no_grad():  # what an optimizer step does: same tensors, new values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    after = engine.generate(ids, mask, sampling)
    assert not torch.equal(before.response_ids, after.response_ids)
    logits = teacher_forced_logits(model, ids, mask, after.response_ids, after.response_mask)
    expected = torch.log_softmax(logits, -1).gather(-1, after.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(after.logprobs, expected * after.response_mask, atol=1e-5, rtol=0)
    assert torch.equal(after.response_ids, hf_greedy(model, ids, mask, sampling)[0])


def test_sliding_window_counts_real_tokens(tiny_model_factory, tmp_path):
    """Mistral with a 4-token window: each left-padded row continues as HF generate continues it alone."""
    model_dir = shutil.copytree(tiny_model_factory("mistral"), tmp_path / "window")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    out = engine_for(model).generate(ids, mask, greedy())
    for row in range(len(PROMPTS)):
        alone_ids, alone_mask = left_padded(model_dir, [PROMPTS[row]])
        expected, _ = hf_greedy(model, alone_ids, alone_mask, greedy())
        assert torch.equal(out.response_ids[row], expected[0])
    full = with_lora(tiny_model_factory("mistral"))  # the window matters for these lengths
    assert not torch.equal(engine_for(full).generate(ids, mask, greedy()).response_ids, out.response_ids)


def test_chunked_prefill_split_batches_and_a_grown_cache_change_nothing(tiny_model_factory, caplog):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = greedy()
    expected = engine_for(model).generate(ids, mask, sampling)
    chunked = engine_for(model, prefill_chunk=3).generate(ids, mask, sampling)
    split = engine_for(model, max_batch_size=3).generate(ids, mask, sampling)  # 3 rows + 1 row
    with caplog.at_level(logging.WARNING):
        grown = engine_for(model, max_length=4).generate(ids, mask, sampling)
    assert "re-allocating the KV cache" not in caplog.text  # a first allocation is sized to the request
    for out in (chunked, split, grown):
        assert torch.equal(out.response_ids, expected.response_ids)
        torch.testing.assert_close(out.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    engine = engine_for(model, max_length=4)
    engine.generate(ids, mask, SamplingConfig(max_new_tokens=1, temperature=0.0))
    slots = engine.cache.max_len
    longer = SamplingConfig(max_new_tokens=slots, temperature=0.0)  # prompt + response > slots
    with caplog.at_level(logging.WARNING):
        again = engine.generate(ids, mask, longer)
    assert "re-allocating the KV cache" in caplog.text and engine.cache.max_len > slots
    assert torch.equal(again.response_ids, engine_for(model).generate(ids, mask, longer).response_ids)


def test_stop_callback_ends_rows_at_the_first_length_it_holds(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    full = engine_for(model).generate(ids, mask, greedy())
    seen = []

    def stop(row: int, tokens: list[int]) -> bool:
        seen.append(row)
        return row in (0, 2) and len(tokens) >= 3 + row  # row 0 after 3 tokens, row 2 after 5

    out = engine_for(model, check_every=4).generate(ids, mask, greedy(), stop=stop)
    assert out.response_mask.sum(1).tolist() == [3, NEW, 5, NEW]
    assert torch.equal(out.response_ids[1], full.response_ids[1])
    assert torch.equal(out.response_ids[0, :3], full.response_ids[0, :3])
    assert (out.response_ids[0, 3:] == 0).all() and (out.logprobs[0, 3:] == 0).all()
    assert set(seen) == {0, 1, 2, 3}


def rerun_capture(fn, pool):
    """A stand-in for CUDA graph capture on CPU: replay re-runs the step into the captured output tensor,
    so the engine's static buffers, buckets, graph keys and weight guard run as on GPU."""
    out = fn()
    return lambda: out.copy_(fn()), out


def test_graph_bookkeeping_buckets_adapters_and_stale_weights(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = greedy()
    eager = engine_for(model).generate(ids, mask, sampling)
    engine = engine_for(model, cuda_graphs=True, capture=rerun_capture)
    assert engine.buckets == [1, 2, 4, 8]
    out = engine.generate(ids[:3], mask[:3], sampling)  # 3 rows padded to the bucket of 4
    assert torch.equal(out.response_ids, eager.response_ids[:3])
    assert torch.equal(engine.generate(ids, mask, sampling).response_ids, eager.response_ids)
    assert len(engine.graphs.graphs) == 1  # the same bucket and model state: one graph
    with model.disable_adapter():  # the reference policy gets its own graph, not the actor's
        reference = engine.generate(ids, mask, sampling)
        assert torch.equal(reference.response_ids, hf_greedy(model, ids, mask, sampling)[0])
    assert len(engine.graphs.graphs) == 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1.0)  # in place: the graphs see it
    flipped = engine.generate(ids, mask, sampling)
    assert torch.equal(flipped.response_ids, engine_for(model).generate(ids, mask, sampling).response_ids)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    for layer in lora_layers:  # a float a captured graph holds as a constant: another graph
        layer.scaling.update({name: value * 2 for name, value in layer.scaling.items()})
    engine.generate(ids, mask, sampling)
    assert len(engine.graphs.graphs) == 3
    for layer in lora_layers:
        layer.scaling.update({name: value / 2 for name, value in layer.scaling.items()})
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.data = lora_b.data.clone()  # a new tensor: a graph would keep reading the old one
    with pytest.raises(StaleGraphError, match="lora_B"):
        engine.generate(ids, mask, sampling)


def test_a_smaller_reallocated_cache_is_captured_in_bounds(tiny_model_factory):
    """A long request grows the cache; a later one in another dtype re-allocates it at the requested size,
    smaller: the capture before its prefill must not write at the long request's last slot."""
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    engine = engine_for(model, cuda_graphs=True, capture=rerun_capture, max_length=32)
    engine.generate(ids, mask, SamplingConfig(max_new_tokens=60, temperature=0.0))
    grown = engine.cache.max_len
    with torch.autocast("cpu", dtype=torch.bfloat16):
        short = SamplingConfig(max_new_tokens=8, temperature=0.0)
        out = engine.generate(ids, mask, short)
        expected = engine_for(model, max_length=32).generate(ids, mask, short)
    assert engine.cache.max_len < grown and engine.cache.dtype == torch.bfloat16
    assert torch.equal(out.response_ids, expected.response_ids)


def test_a_dropped_engine_is_freed_without_the_cycle_collector(tiny_model_factory):
    """The graphs call back into their engine; that must not keep a dropped engine (KV cache, graph pool,
    model) alive until a cyclic collection: the GSM8K evaluation drops the solver before loading the
    verifier."""
    import gc
    import weakref

    model_dir = tiny_model_factory("llama")
    ids, mask = left_padded(model_dir)
    engine = engine_for(with_lora(model_dir), cuda_graphs=True, capture=rerun_capture)
    engine.generate(ids, mask, greedy())
    assert engine.graphs.graphs
    alive = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert alive() is None
    finally:
        gc.enable()


def test_a_failed_capture_falls_back_to_eager_steps_with_a_warning(tiny_model_factory, caplog):
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)

    def failing_capture(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = engine_for(model, cuda_graphs=True, capture=failing_capture)
    with caplog.at_level(logging.WARNING, logger="rlhf.generation.engine"):
        out = engine.generate(ids, mask, greedy())
    assert engine.graphs is None
    assert "decoding eagerly from now on" in caplog.text and "stream is capturing" in caplog.text
    assert torch.equal(out.response_ids, engine_for(model).generate(ids, mask, greedy()).response_ids)


def test_build_generator_resolves_the_engine_flag(tiny_model_factory, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = with_lora(tiny_model_factory("llama"))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64)).eval()

    @contextmanager
    def context(m):
        yield m

    sampling = greedy()
    kwargs = dict(max_prompt_length=16, max_batch_size=4)
    with caplog.at_level(logging.INFO, logger="rlhf.generation.build"):
        assert isinstance(
            build_generator("auto", lambda: context(model), sampling, **kwargs), EngineGenerator
        )
        assert isinstance(build_generator("auto", lambda: context(gpt2), sampling, **kwargs), HFGenerator)
    assert "generation engine: static (--generation_engine auto)" in caplog.text
    assert "generation engine: hf (--generation_engine auto: the static engine runs" in caplog.text
    assert isinstance(build_generator("hf", lambda: context(model), sampling, **kwargs), HFGenerator)
    beams = SamplingConfig(max_new_tokens=4, temperature=0.0, num_beams=2)
    assert isinstance(build_generator("auto", lambda: context(model), beams, **kwargs), HFGenerator)
    for kind, m, s, message in [
        ("static", gpt2, sampling, "--generation_engine static: the static engine runs llama, mistral"),
        ("static", model, beams, "--generation_engine static: beam search"),
        ("vllm", model, sampling, "--generation_engine must be one of auto, hf, static"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_generator(kind, lambda m=m: context(m), s, **kwargs)


def test_engine_generator_is_a_drop_in_generator(tiny_model_factory):
    """``generate(prompt_ids, prompt_mask)`` inside the model context, as the PPO loop calls HFGenerator."""
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    model.add_adapter("critic", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, mask = left_padded(model_dir)
    entered = []

    @contextmanager
    def actor():
        entered.append(True)
        model.set_adapter("actor")
        yield model

    sampling = greedy()
    generator = build_generator("static", actor, sampling, max_prompt_length=ids.shape[1], max_batch_size=4)
    model.set_adapter("critic")  # another adapter is active outside the context
    out = generator.generate(ids, mask)
    model.set_adapter("actor")
    assert torch.equal(out.response_ids, hf_greedy(model, ids, mask, sampling)[0])
    assert generator.generate(ids, mask).response_ids.shape == out.response_ids.shape
    assert len(entered) == 3 and generator.engine.cache.max_len >= ids.shape[1] + NEW
    assert generator.engine is generator.engine_for(model)  # built once, reused


def test_steps_with_host_decisions_are_never_captured(tiny_model_factory):
    """Mixtral's expert routing chooses rows on the host: its steps run eagerly, and forcing graphs fails."""
    model = with_lora(tiny_model_factory("mixtral"))
    assert not decoder_for(model).capturable
    assert engine_for(model).graphs is None
    with pytest.raises(ConfigError, match="cannot be captured as CUDA graphs"):
        engine_for(model, cuda_graphs=True, capture=rerun_capture)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_merged_lora_weights_decode_like_the_unmerged_adapter(tiny_model_factory, family):
    """Greedy tokens equal the unmerged engine's and HF generate's (fp32), log-probs within 1e-5; q/k/v
    biases (qwen2) and sliding windows (mistral) included."""
    model_dir = tiny_model_factory(family)
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = greedy()
    decoder = decoder_for(model, merge_lora=True)
    assert all(isinstance(p.attention_norm, FusedRMSNorm) for p in decoder.layers)  # the fused path runs
    merged = RolloutEngine(decoder, max_batch_size=4, max_length=32)
    out = merged.generate(ids, mask, sampling)
    unmerged = engine_for(model).generate(ids, mask, sampling)
    assert torch.equal(out.response_ids, unmerged.response_ids)
    assert torch.equal(out.response_ids, hf_greedy(model, ids, mask, sampling)[0])
    torch.testing.assert_close(out.logprobs, unmerged.logprobs, atol=1e-5, rtol=1e-5)


def test_merged_lora_weights_follow_updates_and_adapter_state(tiny_model_factory):
    """In-place adapter updates reach the next generation (graph bookkeeping on, the copy keeps its
    addresses); with the adapter disabled the copy holds the base weights (the reference policy)."""
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = greedy()
    decoder = decoder_for(model, merge_lora=True)
    engine = RolloutEngine(decoder, max_batch_size=4, max_length=32, cuda_graphs=True, capture=rerun_capture)
    engine.generate(ids, mask, sampling)
    addresses = [f.weight.data_ptr() for f in decoder.fused]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    updated = engine.generate(ids, mask, sampling)
    fresh = engine_for(model).generate(ids, mask, sampling)
    assert torch.equal(updated.response_ids, fresh.response_ids)
    torch.testing.assert_close(updated.logprobs, fresh.logprobs, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        reference = engine.generate(ids, mask, sampling)
        assert torch.equal(reference.response_ids, hf_greedy(model, ids, mask, sampling)[0])
    assert [f.weight.data_ptr() for f in decoder.fused] == addresses


def test_merged_lora_weights_refuse_mixture_of_experts(tiny_model_factory):
    mixtral = with_lora(tiny_model_factory("mixtral"))
    with pytest.raises(ValueError, match="mixture of experts"):
        decoder_for(mixtral, merge_lora=True)
    with pytest.raises(ConfigError, match="^--generation_lora merged: mixtral has no dense gate/up/down MLP"):
        build_generator(
            "auto",
            lambda: nullcontext(mixtral),
            greedy(),
            max_prompt_length=16,
            max_batch_size=4,
            merge_lora=True,
        )


def test_merged_copy_is_formed_in_float32_under_autocast(tiny_model_factory):
    """The PPO loop generates under the backend's autocast; the merge (B @ A) must not run in bf16."""
    model = with_lora(tiny_model_factory("llama"))
    decoder = decoder_for(model, merge_lora=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.refresh()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + q.get_delta_weight("actor")  # float32 outside autocast
    rows = q.base_layer.out_features
    merged = decoder.layers[0].qkv_proj.weight[:rows]
    assert merged.dtype == torch.bfloat16  # the dtype the steps compute in under that autocast
    assert torch.equal(merged, expected.bfloat16())  # formed in float32, rounded once


def test_merged_copy_takes_the_dtype_the_steps_compute_in(tiny_model_factory):
    """float32 weights under the rollout's bf16 autocast: the copy is bf16 (half the memory, no cast of
    every weight at every step) and decodes under that autocast; without autocast it is float32."""
    model = with_lora(tiny_model_factory("llama"))
    ids, mask = left_padded(tiny_model_factory("llama"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = decoder_for(model, merge_lora=True)
        assert {f.weight.dtype for f in decoder.fused} == {torch.bfloat16}
        out = RolloutEngine(decoder, max_batch_size=4, max_length=32).generate(ids, mask, greedy())
    assert out.response_mask.sum() > 0 and torch.isfinite(out.logprobs).all()
    assert {f.weight.dtype for f in decoder_for(model, merge_lora=True).fused} == {torch.float32}
    # built under autocast, then used without it (or the reverse): the copy follows the steps' dtype
    engine = RolloutEngine(decoder, max_batch_size=4, max_length=32)
    plain = engine.generate(ids, mask, greedy())
    assert {f.weight.dtype for f in decoder.fused} == {torch.float32}
    expected = RolloutEngine(decoder_for(model, merge_lora=True), max_batch_size=4, max_length=32)
    assert torch.equal(plain.response_ids, expected.generate(ids, mask, greedy()).response_ids)


def test_a_failed_compile_is_raised_not_taken_for_a_capture_failure(tiny_model_factory, caplog):
    """--generation_compile failing is the user's flag failing: it raises, with no 'capture failed'
    warning and no eager fallback that would call the broken compiled step again."""
    from torch._dynamo.exc import TorchDynamoException

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the compiler broke")

    model_dir = tiny_model_factory("llama")
    ids, mask = left_padded(model_dir)
    engine = RolloutEngine(
        decoder_for(with_lora(model_dir)), max_batch_size=4, max_length=32, cuda_graphs=True,
        capture=rerun_capture, compile_backend=broken_backend,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING), pytest.raises(TorchDynamoException, match="the compiler broke"):
        engine.generate(ids, mask, greedy())
    assert "CUDA graph failed" not in caplog.text


@pytest.mark.parametrize("merge_lora", [False, True], ids=["unmerged", "merged"])
def test_compiled_decode_step_decodes_the_same_tokens(tiny_model_factory, merge_lora):
    """``compile_backend``: the decode step traced by torch.compile (aot_eager here: the same tracing and
    functionalisation as inductor, without generating kernels) gives the eager tokens and log-probs, and
    still reads in-place adapter updates."""
    model_dir = tiny_model_factory("llama")
    model = with_lora(model_dir)
    ids, mask = left_padded(model_dir)
    sampling = greedy()
    compiled = RolloutEngine(
        decoder_for(model, merge_lora=merge_lora),
        max_batch_size=4,
        max_length=32,
        compile_backend="aot_eager",
    )
    out = compiled.generate(ids, mask, sampling)
    eager = engine_for(model).generate(ids, mask, sampling)
    assert torch.equal(out.response_ids, eager.response_ids)
    torch.testing.assert_close(out.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    assert torch.equal(
        compiled.generate(ids, mask, sampling).response_ids,
        engine_for(model).generate(ids, mask, sampling).response_ids,
    )


def test_hf_generate_samples_from_the_model_not_its_generation_config_file(tiny_model_factory, caplog):
    """A generation_config.json that suppresses tokens or penalises repeats must not change what the HF
    path samples: the log-probs it returns are of the raw distribution, as the static engine's are. The
    model's own configuration is back in place afterwards, and one log line names what was left out."""
    model = with_lora(tiny_model_factory("llama"))
    base = model.get_base_model()
    base.generation_config.suppress_tokens = list(range(10, 500))
    base.generation_config.repetition_penalty = 5.0
    ids, mask = left_padded(tiny_model_factory("llama"))
    sampling = SamplingConfig(max_new_tokens=12, min_new_tokens=12, temperature=1.0, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    generator = HFGenerator(lambda: nullcontext(model), sampling)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="rlhf.generation.hf"):
        out = generator.generate(ids, mask)
    assert ((out.response_ids >= 10) & (out.response_ids < 500)).float().mean() > 0.5
    assert "repetition_penalty, suppress_tokens are not used" in caplog.text
    assert base.generation_config.repetition_penalty == 5.0
