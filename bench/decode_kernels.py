"""Kernels per decode step of the rollout engine, counted on CPU: what a CUDA-graph step costs beyond its
weight reads, measured without a GPU.

``python bench/decode_kernels.py`` counts the aten ops one eager decode step dispatches that do work
(:func:`rollout.compute_ops_per_step`: views and allocations left out; a GPU runs about one kernel for each)
on llamas of 2 and 4 layers (hidden 64, 4 heads / 2 kv), LoRA r=8 on all linear layers active, for the
adapter unmerged (PEFT's layers) and merged (``--generation_lora merged``), in float32 and as the GPU runs
PPO: a bf16 base with the float32 adapter PPO trains, under bf16 autocast. The two depths give a fixed part
and a per-layer part, extrapolated to the 22 layers of the TinyLlama-1.1B shape and the 32 of Llama-2-7B.
Writes the ``decode-kernels-cpu`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import markdown_table, update_section  # noqa: E402
from rollout import compute_ops_per_step  # noqa: E402

DEPTHS = (2, 4)
TARGETS = {"1.1B shape (22 layers)": 22, "7B shape (32 layers)": 32}
# the H200 rollout run of 2026-11-27 (bench/RESULTS.md, `rollout-gpu`): its `ours` row decoded the unmerged
# 1.1B step in 7.64 ms for about 1,835 kernels, about 4 µs per kernel
US_PER_KERNEL = 4.0
# kernels per layer that CUDA's one fused `aten::_fused_rms_norm` per norm saves on the bf16 rows' count: two
# norms of 6 ops plus a float32 round trip of 2 casts on CPU, 1 kernel each on a GPU
BF16_NORM_SAVING = 14
TARGET_MS = 3.0  # issue 13's target per decode step


def forecast(rows: dict[tuple[bool, str], tuple[int, int]]) -> str:
    """The paragraph after the table: the bf16 1.1B counts read against the H200's per-kernel time.
    ``rows``: (bf16, adapter) -> (fixed kernels, kernels per layer)."""
    layers = TARGETS["1.1B shape (22 layers)"]

    def total(adapter: str) -> int:
        fixed, per_layer = rows[(True, adapter)]
        return fixed + per_layer * layers

    unmerged, merged, peft = total("unmerged"), total("merged"), total("unmerged, PEFT's forward")
    unmerged_layer, peft_layer = rows[(True, "unmerged")][1], rows[(True, "unmerged, PEFT's forward")][1]
    unmerged_cuda, merged_cuda = (n - BF16_NORM_SAVING * layers for n in (unmerged, merged))
    unmerged_ms, merged_ms = (n * US_PER_KERNEL / 1000 for n in (unmerged_cuda, merged_cuda))
    verdict = "within" if merged_ms <= TARGET_MS else "above"
    return (
        "Read against the H200 (2026-11-27, `rollout-gpu` above): the unmerged 1.1B step took 7.64 ms for about "
        "1,835 kernels (that run's `ours` row: bf16 model, float32 adapter, PEFT's forward, no autocast, RoPE in 5 "
        f"kernels: 82 per layer), about {US_PER_KERNEL:g} µs per kernel, far above its ~1 ms of weight reads; the "
        "kernel count is the cost to cut. Since then, PPO under `--bf16` (and `bench/rollout.py`'s `ours` rows on "
        "the GPU) decode the unmerged adapter under bf16 autocast with our LoRA forward, reading bf16 copies of the "
        "adapters that the engine refreshes before each generation (no cast of each adapter matrix at every "
        "step), and RoPE takes 3 kernels (a product, a roll and an addcmul): "
        f"{unmerged_layer} kernels per layer, {unmerged:,} per step as counted, about "
        f"{unmerged_cuda:,} where CUDA runs each RMSNorm (now `F.rms_norm` in every stage, "
        f"`rlhf/models/fused_rms_norm.py`) as one kernel, about {unmerged_ms:.1f} ms at that rate (PEFT's forward "
        f"under the same autocast: {peft_layer} and {peft:,}). The merged step: "
        f"{merged:,} kernels as counted, about {merged_cuda:,} where CUDA runs each `F.rms_norm` as one fused "
        "kernel (on CPU it is 6 ops plus, in bf16, a float32 round trip of 2 casts: "
        f"{BF16_NORM_SAVING} kernels per layer for its two norms; it is called outside autocast, since CUDA "
        f"autocast would run it in float32 with 3 casts around it), about {merged_ms:.1f} ms at "
        f"{US_PER_KERNEL:g} µs per kernel, {verdict} the {TARGET_MS:g} ms target of issue 13; the compiled merged "
        "step (`ours-merged-compiled`, first in the next GPU run) fuses the RMSNorm, RoPE and SiLU chains "
        "further. A forecast from counts, not a GPU timing."
    )


def count(layers: int, merged: bool, bf16: bool, fast_forward: bool = True) -> int:
    """Kernels of one decode step of a fresh ``layers``-layer llama with an active LoRA adapter
    (``fast_forward``: our LoRA forward, as every stage builds its adapters,
    :func:`rlhf.models.lora_forward.use_fast_lora_forward`; else PEFT's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.generation import RolloutEngine
    from rlhf.generation.base import SamplingConfig
    from rlhf.generation.hf_decoder import HFDecoder
    from rlhf.generation.merged_decoder import MergedLoraDecoder
    from rlhf.models.fused_rms_norm import use_fused_rms_norm
    from rlhf.models.lora_forward import use_fast_lora_forward

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )  # fmt: skip
    base = LlamaForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
    lora = LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="actor").eval()
    if fast_forward:  # as every stage builds its models
        use_fast_lora_forward(model)
        use_fused_rms_norm(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # PPO trains the adapter in float32 on a bf16 base
    # the engine is built and run under the rollout's autocast, as PPO does, without autocast's weight-cast
    # cache, as a CUDA graph is captured (rlhf/generation/graphs.py): each float32 adapter weight's cast to
    # bf16 is a kernel of every replayed step
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()
    with autocast:
        engine = RolloutEngine(
            (MergedLoraDecoder if merged else HFDecoder)(model), max_batch_size=4, max_length=32
        )
        ids = torch.randint(4, 256, (4, 8))
        sampling = SamplingConfig(max_new_tokens=2, min_new_tokens=2, eos_token_id=2, pad_token_id=0)
        engine.generate(ids, torch.ones_like(ids), sampling)
        return compute_ops_per_step(engine, 4)


def main() -> None:
    rows, counts = [], {}
    variants = {"unmerged, PEFT's forward": (False, False), "unmerged": (False, True), "merged": (True, True)}
    for bf16 in (False, True):
        for adapter, (merged, fast_forward) in variants.items():
            shallow, deep = (count(n, merged, bf16, fast_forward) for n in DEPTHS)
            per_layer = (deep - shallow) // (DEPTHS[1] - DEPTHS[0])
            fixed = shallow - per_layer * DEPTHS[0]
            counts[(bf16, adapter)] = (fixed, per_layer)
            precision = "bf16 base + float32 adapter, bf16 autocast" if bf16 else "float32"
            rows.append([
                precision, adapter, str(fixed), str(per_layer),
                *(f"{fixed + per_layer * n:,}" for n in TARGETS.values()),
            ])  # fmt: skip
            print(rows[-1], flush=True)
    table = markdown_table(
        ["precision", "adapter", "fixed kernels / step", "kernels / layer", *TARGETS], rows
    )
    text = (
        "## Kernels per decode step, counted on CPU (`bench/decode_kernels.py`)\n\n"
        "The aten ops one eager decode step of the rollout engine dispatches that do work (views and "
        "allocations left out), about one GPU kernel each, on llamas of 2 and 4 layers with LoRA r=8 on all "
        "linear layers active, extrapolated by depth; bf16 rows under bf16 autocast without its weight-cast "
        "cache, as a CUDA graph is captured. Unmerged: our LoRA forward (`use_fast_lora_forward`, as every stage "
        "builds its adapters); PEFT's forward for comparison. A CUDA graph replays the same kernels, so beyond the "
        "weight reads a step costs roughly its kernel count times the GPU's per-kernel time. The CPU runs "
        "`F.rms_norm` (every norm of ours and of the merged step: `rlhf/models/fused_rms_norm.py`) as pow, "
        "mean, add, rsqrt and two products, where CUDA has one fused kernel (`aten::_fused_rms_norm`, which "
        "also does the bf16 rows' float32 round trip, 2 casts per norm here; called outside autocast, since "
        "CUDA autocast would run it in float32 with 3 casts around it): on a GPU those steps have 10 (float32) "
        "to 14 (bf16) kernels per layer fewer than counted here. Hugging Face's RMSNorm modules (the PEFT rows) "
        f"are those six ops on any device. torch {torch.__version__}.\n\n{table}\n\n{forecast(counts)}\n"
    )
    print(text)
    update_section("decode-kernels-cpu", text)


if __name__ == "__main__":
    main()
