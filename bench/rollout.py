"""Rollout generation: Hugging Face ``generate`` (dynamic cache, static cache) against our engine, on the
Hugging Face model (``ours``: what ``run_ppo_with_peft.py`` samples with) and on the tensor-parallel model at
TP=1 (``ours-tp``: what ``rlhf.tp.ppo_train`` and ``rlhf.tp.solver_evaluate`` sample with).

Same model, prompts and sampling for every row, each in its own process (``--worker NAME``) so that its peak
memory is its own: an actor LoRA adapter (r=8 on all linear layers, non-zero B; for ``ours-tp`` the TP
model's own LoRA, :mod:`rlhf.tp.lora`) active on the base, every row sampling exactly ``new_tokens`` tokens
(min = max new tokens) at temperature 1.

- GPU: TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab
  32000), bf16, 64 prompts of 128 tokens, 256 new tokens; section ``rollout-gpu`` of bench/RESULTS.md.
- CPU (or ``--cpu-small``): the small llama of :func:`bench.harness.build_bench_model` on CPU (hidden 256,
  4 layers), fp32, 16 prompts of 32 tokens, 64 new tokens, one thread; section ``rollout-cpu``.

On GPU the ``ours`` rows on the Hugging Face model run under bf16 autocast with our LoRA forward
(:mod:`rlhf.models.lora_forward`) and fused RMSNorm (:mod:`rlhf.models.fused_rms_norm`), as
``run_ppo_with_peft.py --bf16`` samples; the
``hf-generate`` rows call ``generate`` on the bf16 model (PEFT's forward) without autocast, as a user would.

Per implementation: ms per decode step ((time for N tokens - time for 1 token) / (N - 1)), tokens/s
(B x N / time for N tokens), the first and a steady call's time (the first includes allocation, compilation
and graph capture), the engine's graph-capture time, and peak memory (CUDA max allocated; max RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from results_file import markdown_table, update_section  # noqa: E402

SHAPES = {
    "gpu": {"batch": 64, "prompt": 128, "new_tokens": 256, "dtype": "bfloat16", "repeats": 1},
    "cpu-small": {"batch": 16, "prompt": 32, "new_tokens": 64, "dtype": "float32", "repeats": 3},
}
# in the order they run: ours first; HF with the static cache (it compiles on GPU) last. ``ours-merged``:
# --generation_lora merged; ``-compiled``: the decode step through torch.compile (inductor) before capture
IMPLS = [
    "ours",
    "ours-merged",
    "ours-compiled",
    "ours-merged-compiled",
    "hf-generate",
    "ours-tp",
    "hf-generate-static-cache",
]
# GPU only, after the rows above: the Llama-2-7B shape at batch 32 (NAME@7b runs NAME on it)
LARGE_IMPLS = ["ours@7b", "ours-merged@7b", "ours-merged-compiled@7b", "hf-generate@7b"]
# seconds a row needs on an H200 (2026-11-27: a row 25-45 s, HF generate's first call 29 s; a cold inductor
# compile of the 22-layer step ~30 s more), so a slow compiled row does not get the quick ones skipped
GPU_ROW_SECONDS = {
    "ours": 30.0, "ours-merged": 30.0, "ours-compiled": 65.0, "ours-merged-compiled": 65.0,
    "hf-generate": 55.0, "ours-tp": 40.0, "hf-generate-static-cache": 80.0, "build-7b": 60.0,
    "ours@7b": 45.0, "ours-merged@7b": 50.0, "ours-merged-compiled@7b": 80.0, "hf-generate@7b": 75.0,
}  # fmt: skip
AUTOCAST_NOTE = (
    ", the ours rows under bf16 autocast with our LoRA forward and fused RMSNorm, as run_ppo_with_peft.py"
    " --bf16 samples, the HF rows with PEFT's forward and without autocast"
)
LARGE_SHAPE = {"batch": 32, "prompt": 128, "new_tokens": 256, "dtype": "bfloat16", "repeats": 1}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def tp_actor(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The TP model of ``model_dir`` at TP=1 with a LoRA adapter (r=8, all linear layers, non-zero B)."""
    from rlhf.tp.distributed import device, init_model_parallel
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers

    init_model_parallel()
    model = load_tp_model(str(model_dir), rank=0, world_size=1, device=device(), dtype=dtype)
    apply_lora(model, r=8, alpha=16, targets=["all"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    return model.eval()


def compute_ops_per_step(engine, batch: int) -> int:
    """On CPU: the aten ops one eager decode step dispatches that do work (views, aliases and empty
    allocations left out). A GPU runs about one kernel for each (some fewer: CPU builds RMSNorm from pow,
    mean, rsqrt and mul, where CUDA has one fused kernel), so this counts a step's kernels without a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    no_kernel = ("aten.empty", "aten.detach", "aten.lift_fresh", "aten._unsafe_view", "aten._local_scalar")

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and not str(func.overloadpacket).startswith(no_kernel):
                CountOps.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), engine.decoder.generating(), CountOps():
        engine._decode_step(batch)
    return CountOps.count


def step_profile(engine, batch: int) -> dict:
    """On GPU: the GPU time of one decode-graph replay (mean of 20, CUDA events) and the CUDA kernels of one
    decode step run outside the graph (torch.profiler), to tell the graph's own cost from the host loop's.
    On CPU, for eager steps: the compute ops of one step (:func:`compute_ops_per_step`)."""
    if not torch.cuda.is_available():
        compiled = engine._step != engine.decoder.step  # inductor's fused CPU kernels: not comparable
        return {} if compiled else {"kernels_per_step": compute_ops_per_step(engine, batch)}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from rlhf.generation.attention import sdpa_backends

    result = {}
    keys = [key for key in (engine.graphs.graphs if engine.graphs else {}) if key[0] == batch]
    if keys:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        engine.graphs.run(keys[0])
        start.record()
        for _ in range(20):
            engine.graphs.run(keys[0])
        end.record()
        torch.cuda.synchronize()
        result["replay_ms"] = start.elapsed_time(end) / 20
    try:
        with (
            torch.no_grad(),
            sdpa_backends(torch.device("cuda")),
            engine.decoder.generating(),  # as inside a generation (the adapters' bf16 copies)
            # as the step was captured (graphs.py): the autocast cache off, else a compiled step recompiles
            torch.autocast(
                "cuda",
                dtype=torch.get_autocast_dtype("cuda"),
                enabled=torch.is_autocast_enabled("cuda"),
                cache_enabled=False,
            ),
            profile(activities=[ProfilerActivity.CUDA]) as prof,
        ):
            engine._decode_step(batch)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        result["kernels_per_step"] = len(kernels)
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name[:60], []).append(e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
        # for the log, not the table: where one eager step's GPU time goes (µs, calls)
        result["top_kernels"] = [f"{sum(t):.0f} us x{len(t)} {name}" for name, t in top]
    except Exception as error:  # the profiler is a diagnostic: its failure must not lose the row
        result["kernels_error"] = f"{type(error).__name__}: {error}"[:120]
    return result


def build_large(model_dir: Path, out: Path) -> None:
    """The Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, no GQA, intermediate 11008), random init in
    bf16 on the GPU, with ``model_dir``'s tokenizer and vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    config.update(dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128))  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def worker(name: str, workdir: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.generation import SamplingConfig
    from rlhf.generation.build import decoder_for
    from rlhf.generation.engine import RolloutEngine
    from rlhf.models.fused_rms_norm import use_fused_rms_norm
    from rlhf.models.lora_forward import use_fast_lora_forward

    if name == "build-7b":
        harness.cached_build(
            f"rollout-7b-{'data' if harness.has_shared_data() else 'sample'}",
            workdir / "model-7b",
            lambda out: build_large(workdir / "model", out),
        )
        return {"name": name}
    label = name
    name, _, size = name.partition("@")
    shape = json.loads((workdir / f"shape{'-' + size if size else ''}.json").read_text())
    model_dir = workdir / (f"model-{size}" if size else "model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, shape["dtype"])
    torch.manual_seed(0)
    if name == "ours-tp":
        model = tp_actor(model_dir, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False
        )
        model = get_peft_model(model, lora, adapter_name="actor").eval()
        if name.startswith("ours"):  # as run_ppo_with_peft.py builds its models
            use_fast_lora_forward(model)
            use_fused_rms_norm(model)
    config = AutoConfig.from_pretrained(model_dir)
    batch, prompt, new = shape["batch"], shape["prompt"], shape["new_tokens"]
    ids = torch.randint(4, config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    eos = config.eos_token_id
    # ours on the HF model in bf16 runs under bf16 autocast, as run_ppo_with_peft.py --bf16 samples; the HF
    # rows call generate on the bf16 model as a user would, without autocast
    autocast = name.startswith("ours") and name != "ours-tp" and dtype != torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        engine = None
        if name.startswith("ours"):
            engine = RolloutEngine(
                decoder_for(model, merge_lora="merged" in name), max_batch_size=batch, max_length=prompt + new,
                compile_backend="inductor" if name.endswith("-compiled") else None,
            )  # fmt: skip

        def generate(n: int) -> None:
            if engine is not None:
                sampling = SamplingConfig(
                    max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=0
                )
                engine.generate(ids, mask, sampling)
                return
            cache = {"cache_implementation": "static"} if name == "hf-generate-static-cache" else {}
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
                    max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=0, **cache,
                )  # fmt: skip

        first = _timed(lambda: generate(new))
        full = min(_timed(lambda: generate(new)) for _ in range(shape["repeats"]))
        one = min(_timed(lambda: generate(1)) for _ in range(shape["repeats"]))
        result = {
            "name": label,
            "ms_per_step": (full - one) / (new - 1) * 1000,
            "tokens_per_s": batch * new / full,
            "first_call_s": first,
            "steady_call_s": full,
            "capture_s": engine.graphs.capture_seconds if engine is not None and engine.graphs else None,
            "cuda_graphs": bool(engine is not None and engine.graphs),
            "peak_mb": harness.peak_memory_mb(),
            **harness.compile_stats(),
        }
        if engine is not None:  # the measurement first: a profile cut by the time limit must not lose it
            print(json.dumps(result), flush=True)
            result.update(step_profile(engine, batch))
    if name == "ours-tp":  # free the (NCCL on a GPU) process group now: its teardown at exit can hang
        from rlhf.tp.distributed import shutdown

        shutdown()
    return result


def device_line(gpu: bool) -> str:
    if gpu:
        return f"GPU {torch.cuda.get_device_name()}"
    return f"CPU ({platform.machine()}, 1 thread)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-small", action="store_true", help="the small CPU shape even on a GPU")
    parser.add_argument("--worker", help="internal: run one implementation")
    parser.add_argument("--workdir")
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="seconds for all runs; a run that would overrun is skipped",
    )
    parser.add_argument(
        "--rows",
        help=f"comma list of rows to run, in that order (default: all): {', '.join(IMPLS + LARGE_IMPLS)}",
    )
    args = parser.parse_args()
    if args.worker:
        harness.report(worker(args.worker, Path(args.workdir)))
        return
    wanted = args.rows.split(",") if args.rows else IMPLS + LARGE_IMPLS
    unknown = sorted(set(wanted) - set(IMPLS + LARGE_IMPLS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(IMPLS + LARGE_IMPLS)})")
    if args.cpu_small:  # the CPU shape on the CPU, also on a GPU machine (the workers inherit this)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    gpu = harness.on_gpu() and not args.cpu_small
    shape = SHAPES["gpu" if gpu else "cpu-small"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # from before the build: the budget is the process's
        deadline = harness.Deadline(args.budget, GPU_ROW_SECONDS if gpu else None)
        harness.build_bench_model(workdir / "model")
        (workdir / "shape.json").write_text(json.dumps(shape))
        results = []
        for name in [n for n in wanted if n in IMPLS]:
            results.append(deadline.run(__file__, name, workdir))
            print(json.dumps(results[-1]), flush=True)
        large = [n for n in wanted if n in LARGE_IMPLS]
        if gpu and large:
            (workdir / "shape-7b.json").write_text(json.dumps(LARGE_SHAPE))
            built = deadline.run(__file__, "build-7b", workdir)
            for name in large:
                results.append(built if "error" in built else deadline.run(__file__, name, workdir))
                results[-1] = {**results[-1], "name": name}
                print(json.dumps(results[-1]), flush=True)
    bases = {
        r["name"].partition("@")[2]: r
        for r in results
        if r["name"].partition("@")[0] == "hf-generate" and "error" not in r
    }
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "error: " + r["error"][:100], "", "", "", "", "", "", ""])
            continue
        base = bases.get(r["name"].partition("@")[2])
        speedup = f"{base['ms_per_step'] / r['ms_per_step']:.2f}" if base else "n/a"
        capture = f"{r['capture_s']:.2f}" if r["capture_s"] is not None else "-"
        calls = f"{r['first_call_s']:.2f} / {r['steady_call_s']:.2f}"
        name = r["name"] + (
            " (CUDA graphs)" if r["cuda_graphs"] else " (no graphs)" if r["name"].startswith("ours") else ""
        )
        replay = f"{r['replay_ms']:.2f}" if r.get("replay_ms") is not None else "-"
        kernels = str(r.get("kernels_per_step", "-"))
        rows.append([
            name, f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", calls, capture,
            f"{r['peak_mb']:,.0f}", speedup, replay, kernels,
        ])  # fmt: skip
    table = markdown_table(
        ["implementation", "ms / decode step", "tokens/s", "first / steady call s", "graph capture (+ compile) s", "peak MB",
         "HF generate ms/step ÷ this", "graph replay ms", "kernels / step"], rows,
    )  # fmt: skip
    model = (
        "TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab 32000)"
        if gpu
        else "small llama (hidden 256, 4 layers, 8 heads, 4 kv heads, vocab 512)"
    )
    text = (
        f"## Rollout generation, {'GPU' if gpu else 'CPU'} (`bench/rollout.py{'' if gpu else ' --cpu-small'}`)\n\n"
        f"Device: {device_line(gpu)}. Model: {model}, random init, {shape['dtype']}, actor LoRA r=8 on all "
        f"linear layers active (unmerged; float32 adapter weights{AUTOCAST_NOTE if gpu else ''}). {shape['batch']} prompts of {shape['prompt']} tokens, "
        f"{shape['new_tokens']} sampled tokens each (min = max), temperature 1, all rows in the same run, each "
        "in its own process; ours-merged decodes from merged LoRA weights (--generation_lora merged), "
        "-compiled runs the decode step through torch.compile (inductor) before graph capture (its compile runs in the capture's warm-up steps, so it is in the capture column: the issue's \"capture or compile warm-up\"), ours-tp is the "
        "engine on the tensor-parallel model (TP=1, its own LoRA). ms / decode step = (time for N tokens - time for 1) / (N - 1); the first call "
        "(N tokens) includes the warm-up (cache allocation, compilation, graph capture), the steady call does not. Peak MB: CUDA max allocated on GPU, max RSS on CPU. Rows NAME@7b (GPU): NAME on the Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, no grouped-query attention, random init), 32 prompts, same lengths, ratio against hf-generate@7b. On GPU, graph replay ms = the GPU time of one decode-graph replay (CUDA events, mean of 20) and kernels / step = the CUDA kernels of one decode step run outside the graph (torch.profiler); on CPU, kernels / step = the aten ops one eager decode step dispatches that do work (views and allocations left out), about one GPU kernel each (not counted for the compiled rows, whose CPU kernels inductor fuses differently)."
        + (
            ""
            if gpu
            else " On CPU our engine runs eagerly (no CUDA graphs) and attends over every cache slot at each step"
            " (the fixed shapes a graph needs), so it is not expected to beat HF generate here; on a shared"
            " 2-core machine the ratio moved between 0.6 and 2.3 from run to run. Best of 3 calls per process."
        )
        + f"\n\n{table}\n"
    )
    print(text)
    update_section("rollout-gpu" if gpu else "rollout-cpu", text)


if __name__ == "__main__":
    main()
