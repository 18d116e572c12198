"""The engine's CUDA-graph path on a GPU (marker ``gpu``; skipped without CUDA, deselected by ``make test``).

Run with ``pytest -m gpu tests/test_generation_gpu.py`` on a CUDA machine. On an H200 (2026-11-27) the
first three passed; the merged/compiled and ``ppo_built`` tests, the merged decoder, fused RMSNorm and the
fused LoRA forward came later and have never run on a GPU (a failure there is news, not a regression).
The CPU tests cover the same logic eagerly (and the graph bookkeeping with a capture that
re-runs the step); these check what only real graphs can break: replays that read the
live weights, a new graph per adapter state, the stale-weight guard, identical tokens to eager steps, and the
model PPO builds under bf16 autocast (our LoRA forward and its bf16 adapter copies, fused RMSNorm).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from test_generation_engine import PROMPTS, greedy, hf_greedy, left_padded, teacher_forced_logits, with_lora

from rlhf.generation import SamplingConfig
from rlhf.generation.build import decoder_for
from rlhf.generation.engine import RolloutEngine
from rlhf.generation.graphs import StaleGraphError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)"),
]


def cuda_model(
    tiny_model_factory, family: str = "llama", dtype: torch.dtype = torch.float32, copies: int = 3
):
    model_dir = tiny_model_factory(family)
    model = with_lora(model_dir).to(device="cuda", dtype=dtype)
    ids, mask = left_padded(model_dir, PROMPTS * copies)
    return model, ids.cuda(), mask.cuda()


def flip_adapters_in_place(model) -> None:
    """An optimizer step's stand-in: every LoRA B times -3, in place (the tensors keep their addresses)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)


def engine(model, graphs: bool | None = None) -> RolloutEngine:
    return RolloutEngine(decoder_for(model), max_batch_size=16, max_length=64, cuda_graphs=graphs)


def test_graphs_are_on_by_default_and_match_hf_generate_and_eager_steps(tiny_model_factory):
    model, ids, mask = cuda_model(tiny_model_factory)
    graphed = engine(model)
    assert graphed.graphs is not None
    out = graphed.generate(ids, mask, greedy())  # 12 rows: the bucket of 16
    assert torch.equal(out.response_ids, hf_greedy(model, ids, mask, greedy())[0])
    assert torch.equal(
        out.response_ids, engine(model, graphs=False).generate(ids, mask, greedy()).response_ids
    )
    bf16, ids, mask = cuda_model(tiny_model_factory, dtype=torch.bfloat16)
    eager = engine(bf16, graphs=False).generate(ids, mask, greedy())
    assert torch.equal(engine(bf16).generate(ids, mask, greedy()).response_ids, eager.response_ids)


def test_replays_read_live_weights_and_adapter_state(tiny_model_factory):
    model, ids, mask = cuda_model(tiny_model_factory)
    graphed = engine(model)
    graphed.generate(ids, mask, greedy())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)  # an optimizer step: in place
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9)
    out = graphed.generate(ids, mask, sampling, generator=torch.Generator("cuda").manual_seed(0))
    logits = teacher_forced_logits(model, ids, mask, out.response_ids, out.response_mask)
    expected = torch.log_softmax(logits / 0.8, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected * out.response_mask, atol=1e-4, rtol=0)
    with model.disable_adapter():
        reference = graphed.generate(ids, mask, greedy())
        assert torch.equal(reference.response_ids, hf_greedy(model, ids, mask, greedy())[0])
    assert len(graphed.graphs.graphs) == 2
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.data = lora_b.data.clone()
    with pytest.raises(StaleGraphError):
        graphed.generate(ids, mask, greedy())


def test_mixture_of_experts_decodes_eagerly(tiny_model_factory):
    model, ids, mask = cuda_model(tiny_model_factory, "mixtral")
    moe = engine(model)
    assert moe.graphs is None
    assert torch.equal(
        moe.generate(ids, mask, greedy()).response_ids, hf_greedy(model, ids, mask, greedy())[0]
    )


@pytest.mark.parametrize(
    "merge_lora, compile_backend",
    [(True, None), (False, "inductor"), (True, "inductor")],
    ids=["merged", "compiled", "merged-compiled"],
)
def test_merged_and_compiled_steps_replay_as_graphs(tiny_model_factory, merge_lora, compile_backend):
    """``--generation_lora merged`` and ``--generation_compile`` (inductor) are captured as CUDA graphs (no
    eager fallback), decode the unmerged eager engine's greedy tokens (fp32), and their replays read
    in-place adapter updates through the merged copy's refresh."""
    model, ids, mask = cuda_model(tiny_model_factory)

    def fast() -> RolloutEngine:
        return RolloutEngine(
            decoder_for(model, merge_lora=merge_lora), max_batch_size=16, max_length=64,
            compile_backend=compile_backend,
        )  # fmt: skip

    graphed = fast()
    out = graphed.generate(ids, mask, greedy())
    assert graphed.graphs is not None and len(graphed.graphs.graphs) == 1  # captured, not fallen back
    eager = engine(model, graphs=False).generate(ids, mask, greedy())
    assert torch.equal(out.response_ids, eager.response_ids)
    torch.testing.assert_close(out.logprobs, eager.logprobs, atol=1e-4, rtol=0)
    flip_adapters_in_place(model)
    updated = graphed.generate(ids, mask, greedy())
    assert torch.equal(
        updated.response_ids, engine(model, graphs=False).generate(ids, mask, greedy()).response_ids
    )
    assert not torch.equal(updated.response_ids, out.response_ids)


def test_merged_graphs_in_bf16_replay_the_eager_merged_steps(tiny_model_factory):
    """In bf16 the merged copy rounds differently from the unmerged adapter, so the graph's tokens are
    compared with the same merged steps run eagerly: identical."""
    model, ids, mask = cuda_model(tiny_model_factory, dtype=torch.bfloat16)
    graphed = RolloutEngine(decoder_for(model, merge_lora=True), max_batch_size=16, max_length=64)
    eager = RolloutEngine(
        decoder_for(model, merge_lora=True), max_batch_size=16, max_length=64, cuda_graphs=False
    )
    out = graphed.generate(ids, mask, greedy())
    assert graphed.graphs is not None
    assert torch.equal(out.response_ids, eager.generate(ids, mask, greedy()).response_ids)


def as_ppo_builds(tiny_model_factory):
    """A bf16 base with a float32 adapter, our LoRA forward and fused RMSNorm: the model PPO samples from and
    trains under ``--bf16`` (bf16 autocast)."""
    from rlhf.models.fused_rms_norm import use_fused_rms_norm
    from rlhf.models.lora_forward import use_fast_lora_forward

    model, ids, mask = cuda_model(tiny_model_factory, copies=4)  # 16 rows: a full bucket, no padded rows
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()
    use_fast_lora_forward(model)
    use_fused_rms_norm(model)
    return model, ids, mask


def test_ppo_built_model_replays_graphs_with_the_adapters_bf16_copies(tiny_model_factory):
    """Under bf16 autocast the decode graphs read the engine's bf16 copies of the float32 adapters: the
    same tokens and log-probs as eager steps with and without the copies, and in-place updates seen."""
    model, ids, mask = as_ppo_builds(tiny_model_factory)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9)

    def run(engine_: RolloutEngine):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return engine_.generate(ids, mask, sampling, generator=torch.Generator("cuda").manual_seed(0))

    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed, eager, uncopied = engine(model), engine(model, graphs=False), engine(model, graphs=False)
    uncopied.decoder.generating = nullcontext  # autocast casts the float32 adapters at every step
    out = run(graphed)
    assert graphed.graphs is not None and len(graphed.graphs.graphs) == 1
    for other in (run(eager), run(uncopied)):
        assert torch.equal(out.response_ids, other.response_ids)
        torch.testing.assert_close(out.logprobs, other.logprobs, atol=1e-3, rtol=0)
    flip_adapters_in_place(model)
    updated = run(graphed)
    assert torch.equal(updated.response_ids, run(eager).response_ids)
    assert not torch.equal(updated.response_ids, out.response_ids)


def test_ppo_built_model_trains_as_peft_and_hugging_face_under_bf16_autocast(tiny_model_factory):
    """One forward and backward under CUDA bf16 autocast: our LoRA forward (addmm) and fused RMSNorm (the
    fused CUDA kernels) against PEFT's forward and Hugging Face's RMSNorm on the same weights."""
    ours, ids, mask = as_ppo_builds(tiny_model_factory)
    theirs, _, _ = cuda_model(tiny_model_factory, copies=4)
    theirs.load_state_dict(ours.state_dict())
    for name, param in theirs.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()
    for model in (ours, theirs):  # the norms' weight gradients too (full fine-tuning trains them)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or "norm" in name)
    results = []
    for model in (ours, theirs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = torch.cat(
            [p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.grad is not None]
        )
        results.append((loss.detach().float(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(results[0][1], results[1][1], dim=0) > 0.99
