"""PPO benchmark: ours (run_ppo_with_peft.py, with a critic and critic-free GRPO) against TRL on the same
model, prompts, reward and shapes; and the peak memory of a PPO step before and after chunked log-probs.

    python bench/ppo.py                      # CPU: the small suite + the memory comparison -> bench/RESULTS.md
    python bench/ppo.py --gpu-suite          # GPU: TinyLlama-1.1B and Llama-2-7B shapes, at most ~8 minutes
    python bench/ppo.py --gpu-suite --cpu-small [--results FILE]   # the GPU suite's code path, tiny, on CPU

Rows, each in its own process (``--worker NAME``) so its peak memory (CUDA max allocated on GPU, max RSS on
CPU) is its own: ours PPO with a critic (``gae``, K = 1), ours critic-free (``grpo``, K = 8), TRL 1.16
GRPOTrainer (K = 8), TRL 0.25.1 PPOTrainer, and on GPU ours once more on a Llama-2-7B shape (actor, critic
and reward LoRA adapters on one base). Settings: ``bench/ppo_workers.py``.

A GPU machine without network: ``bash ../shared/gpu/wheels.sh`` gathers trl 1.16 with the other wheels;
TRL 0.25.1 needs its wheel in a folder of its own, ``pip download --no-deps trl==0.25.1 -d
.whl/trl-0.25.1`` (here, with network), which this script puts first on that worker's PYTHONPATH only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from ppo_workers import (  # noqa: E402
    MEMORY_SUITE,
    MEMORY_VARIANTS,
    Shape,
    Suite,
    build,
    memory_run,
    ours,
    trl_grpo,
    trl_ppo,
)
from results_file import markdown_table, update_section  # noqa: E402

TINYLLAMA = Shape("TinyLlama-1.1B shape", 2048, 5632, 22, 32, 4, 32000)
LLAMA2_7B = Shape("Llama-2-7B shape", 4096, 11008, 32, 32, 32, 32000)
SUITES = {
    "gpu": Suite(
        "gpu", TINYLLAMA, LLAMA2_7B, samples=64, group=8, mini_batch=32, prompt_len=128, response_len=256,
        large_batch=32, steps=2, trl_ppo_micro_batch=8, dtype="bfloat16",
    ),
    "cpu": Suite(
        "cpu", Shape("small llama", 256, 704, 4, 8, 4, 512), None, samples=16, group=8, mini_batch=8,
        prompt_len=32, response_len=64, large_batch=0, steps=4, trl_ppo_micro_batch=8, dtype="float32",
    ),
    "cpu-small": Suite(
        "cpu-small", Shape("tiny llama", 64, 176, 2, 4, 2, 512), Shape("tiny stand-in for 7B", 96, 256, 3, 4, 4, 512),
        samples=16, group=8, mini_batch=8, prompt_len=8, response_len=8, large_batch=4, steps=2,
        trl_ppo_micro_batch=4, dtype="float32",
    ),
}  # fmt: skip
GPU_BUDGET_S = 470  # the whole --gpu-suite, building the models included
# row -> (label, what runs it); in the order they run: the targets' rows first, TRL PPO (slowest) last
# the fast rows: the engine's options that are not yet defaults, and no --gradient_checkpointing (at 1.1B
# the activations fit many times over; checkpointing re-runs each layer's forward in the backward)
FAST = ("--generation_lora", "merged", "--generation_compile")
ROWS = {
    "ours-gae": "ours, PPO with critic (gae, K=1)",
    "ours-gae-fast": "ours, gae, + --generation_lora merged --generation_compile, no checkpointing",
    "ours-grpo": "ours, critic-free (grpo, K=8)",
    "ours-grpo-fast": "ours, grpo, + --generation_lora merged --generation_compile, no checkpointing",
    "ours-gae-compiled": "ours, gae fast + --torch_compile (decoder layers compiled; compile in the first step)",
    "ours-grpo-compiled": "ours, grpo fast + --torch_compile (decoder layers compiled; compile in the first step)",
    "trl-grpo": "TRL 1.16 GRPOTrainer (K=8)",
    "ours-large": "ours on the large shape, PPO (gae): actor + critic + reward adapters",
    "trl-ppo": "TRL 0.25.1 PPOTrainer",
    "ours-gae-fast-profile": "ours, gae fast, its last step under --profile_step (timings include the profiler)",
}
OPTIONAL_ROWS = ("ours-gae-fast-profile",)  # only when --rows names them
TARGETS = {  # GPU targets of the issue: (samples/s at least, peak GB at most)
    "ours-gae": (50.0, 30.0),
    "ours-gae-fast": (50.0, 30.0),
    "ours-grpo": (60.0, None),
    "ours-grpo-fast": (60.0, None),
    "ours-gae-compiled": (50.0, 30.0),
    "ours-grpo-compiled": (60.0, None),
    "ours-large": (None, 40.0),
}
# seconds a --gpu-suite row needs to finish (seen on an H200, 2026-11-27): a row started with less left is
# skipped, not started and stopped halfway (a stopped row measures nothing); ours-large includes its build
# what a row needs on an H200 (2026-11-27, and a CPU review of the compile times): the -fast and -compiled
# rows' first step holds the inductor compile of the decoder layers and the graph capture
GPU_ROW_SECONDS = {"trl-grpo": 60.0, "trl-ppo": 60.0, "ours-large": 100.0}
GPU_ROW_SECONDS.update({f"ours-{e}-{v}": 70.0 for e in ("gae", "grpo") for v in ("fast", "compiled")})
GPU_ROW_SECONDS["ours-gae-fast-profile"] = 80.0
GPU_ROW_SECONDS_DEFAULT = 35.0
CPU_ROW_SECONDS = 20.0


def seconds_needed(suite: Suite, name: str) -> float:
    if suite.name != "gpu":
        return CPU_ROW_SECONDS
    return GPU_ROW_SECONDS.get(name, GPU_ROW_SECONDS_DEFAULT)


def run_in_worker(name: str, suite: Suite, workdir: Path) -> dict:
    """What ``--worker name`` does in its process."""
    if name == "build":
        build(suite, workdir)
        return {}
    if name == "build-large":
        build(suite, workdir, large=True)
        return {}
    if name.startswith("memory:"):
        return memory_run(workdir, name.split(":", 1)[1])

    def fast(estimator: str, tag: str, *more: str) -> dict:  # the -fast rows' settings (+ more flags)
        return ours(suite, workdir, estimator, checkpointing=False, extra=(*FAST, *more), tag=tag)

    runs = {
        "ours-gae": lambda: ours(suite, workdir, "gae"),
        "ours-gae-fast": lambda: fast("gae", "ours-gae-fast"),
        "ours-grpo": lambda: ours(suite, workdir, "grpo"),
        "ours-grpo-fast": lambda: fast("grpo", "ours-grpo-fast"),
        "ours-gae-compiled": lambda: fast("gae", "ours-gae-compiled", "--torch_compile"),
        "ours-grpo-compiled": lambda: fast("grpo", "ours-grpo-compiled", "--torch_compile"),
        "ours-large": lambda: ours(suite, workdir, "gae", large=True),
        "ours-gae-fast-profile": lambda: fast(
            "gae", "ours-gae-fast-profile", "--profile_step", str(suite.steps)
        ),
        "trl-grpo": lambda: trl_grpo(suite, workdir),
        "trl-ppo": lambda: trl_ppo(suite, workdir),
    }
    return runs[name]()


def trl_025_site(workdir: Path) -> Path | None:
    """trl 0.25.1 unpacked into its own folder, from ``.whl/trl-0.25.1/`` or else ``pip download`` (None when
    neither has it); put first on PYTHONPATH for its worker only, the rest of the stack is this one's."""
    wheels = sorted((ROOT / ".whl" / "trl-0.25.1").glob("trl-0.25.1-*.whl"))
    if not wheels:
        target = workdir / "trl-0.25.1"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "0", "--timeout", "10",
             "-d", str(target), "trl==0.25.1"], capture_output=True, text=True,
        )  # fmt: skip
        wheels = sorted(target.glob("trl-0.25.1-*.whl"))
    if not wheels:
        return None
    site = workdir / "trl-0.25.1-site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    return site


def run_worker(
    name: str, suite: Suite, workdir: Path, timeout: float, first_path: Path | None = None
) -> dict:
    """Run one row in a fresh process; its last stdout line is JSON (or the error's last line)."""
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if first_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(first_path), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", name, "--suite", suite.name, "--workdir", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (time budget)"}
    if proc.returncode != 0:
        harness.print_failure(name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return harness.last_json_line(name, proc.stdout)


def run_suite(suite: Suite, workdir: Path, budget_s: float, rows: list[str]) -> dict[str, dict]:
    """The ``rows`` of ``suite``, each in its own process, within ``budget_s`` seconds (later rows are
    skipped or stopped when the budget runs out)."""
    deadline = time.monotonic() + budget_s
    left = lambda: deadline - time.monotonic()  # noqa: E731
    error = run_worker("build", suite, workdir, left()).get("error")
    if error:
        return {name: {"error": f"model build failed: {error}"} for name in rows}
    trl_site = trl_025_site(workdir) if "trl-ppo" in rows else None
    results = {}
    for name in rows:
        if name == "ours-large" and suite.large is None:
            continue
        if name == "trl-ppo" and trl_site is None:
            results[name] = {"error": "no trl 0.25.1 wheel (.whl/trl-0.25.1/) and no download"}
            continue
        if left() < seconds_needed(suite, name):
            needed = seconds_needed(suite, name)
            results[name] = {
                "error": f"skipped: {left():.0f} s of the time budget left, the row needs ~{needed:.0f} s"
            }
            print(json.dumps({"row": name, **results[name]}), flush=True)
            continue
        if name == "ours-large":
            error = run_worker("build-large", suite, workdir, left()).get("error")
            if error:
                results[name] = {"error": f"model build failed: {error}"}
                continue
        results[name] = run_worker(name, suite, workdir, left(), trl_site if name == "trl-ppo" else None)
        print(json.dumps({"row": name, **results[name]}), flush=True)
    return results


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.environ.get('BENCH_THREADS', '1')} thread)"
    )


def shape_text(shape: Shape) -> str:
    return (
        f"{shape.label} (hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / {shape.kv_heads} kv, "
        f"vocab {shape.vocab}, random init)"
    )


def suite_table(suite: Suite, results: dict[str, dict]) -> str:
    """The rows as a markdown table, with the ratios to TRL's GRPOTrainer and PPOTrainer (same model and
    samples per step; not for the large row's other model) and, on GPU, the issue's targets."""
    peers = [results.get(peer, {}).get("samples_per_s") for peer in ("trl-grpo", "trl-ppo")]
    header = ["implementation", "samples/step", "samples/s", "s/step", "rollout s/step", "of which generation",
              "train s/step", "first step s", "peak GB", "samples/s vs TRL GRPOTrainer",
              "vs TRL PPOTrainer"]  # fmt: skip
    if suite.name == "gpu":
        header.append("target (samples/s, peak GB)")
    rows = []
    for name, r in results.items():
        label = ROWS[name]
        if "error" in r:
            rows.append(
                [label, "", f"failed: {r['error'][:100]}", "", "", "", "", "", "", "", ""]
                + [""] * (suite.name == "gpu")
            )
            continue
        # the large row runs another model: no ratio to the peers' rows
        ratios = ["- (other shape)" if name == "ours-large" else f"{r['samples_per_s'] / peer:.2f}" if peer else "-"
                  for peer in peers]  # fmt: skip
        generate = f"{r['generate_s']:.2f}" if "generate_s" in r else "-"  # TRL rows: not split
        first = f"{r['first_step_s']:.2f}" if "first_step_s" in r else "-"  # warm-up: compiles, captures
        row = [label, r["samples"], f"{r['samples_per_s']:.2f}", f"{r['step_s']:.2f}", f"{r['rollout_s']:.2f}",
               generate, f"{r['train_s']:.2f}", first, f"{r['peak_mb'] / 1024:.2f}", *ratios]  # fmt: skip
        if suite.name == "gpu":
            rate, peak = TARGETS.get(name, (None, None))
            met = [f"≥ {rate:g}: {'met' if r['samples_per_s'] >= rate else 'missed'}"] if rate else []
            met += [f"≤ {peak:g} GB: {'met' if r['peak_mb'] / 1024 <= peak else 'missed'}"] if peak else []
            row.append("; ".join(met) or "-")
        rows.append(row)
    return markdown_table(header, rows)


def suite_markdown(suite: Suite, results: dict[str, dict]) -> str:
    large = f" The large row: {shape_text(suite.large)}, {suite.large_batch} samples." if suite.large else ""
    return "\n".join([
        f"## PPO, {'GPU' if suite.name == 'gpu' else 'CPU'} (`bench/ppo.py{' --gpu-suite' if suite.name != 'cpu' else ''}`)",
        "",
        f"Device: {device_name()}. Model: {shape_text(suite.model)}, {suite.dtype}, LoRA r=8 on all linear layers."
        f"{large} Per optimizer step: {suite.samples} responses of exactly {suite.response_len} tokens to prompts of "
        f"≤ {suite.prompt_len} tokens (gae: {suite.samples} prompts x 1; grpo and TRL GRPOTrainer: "
        f"{suite.samples // suite.group} prompts x K={suite.group}), the toy rule reward, β = 0.02, mini-batch "
        f"{suite.mini_batch}, 1 epoch, one optimizer step per rollout; mean of {suite.steps - 1} step(s) after "
        "one warm-up step (its time, compiles and CUDA-graph captures included, in the first-step column). "
        "Ours: run_ppo_with_peft.py with --gradient_checkpointing except in the -fast rows; TRL's GRPOTrainer "
        "without it (its default is on), as the -fast rows; LoRA dropout 0.05; the critic-free rows build no critic and, as "
        "TRL's GRPOTrainer, put the KL in the loss (--use_kl_loss), so their update is on-policy and takes its own "
        "forward's log-probs as the old ones (--old_logprobs auto: no actor forward in the rollout, as TRL). TRL 0.25.1 "
        f"PPOTrainer (micro-batch {suite.trl_ppo_micro_batch}, rollout forwards over all {suite.samples} at once) uses four models (LoRA policy, reference = "
        "adapter off, separate reward and fully trained value models) and scores with that reward model, not "
        "the rule; its rollout column is generation only. Peak: CUDA max allocated on GPU, the worker's max "
        "RSS on CPU." + (" Timings on a shared 2-core machine are noisy." if suite.name != "gpu" else ""),
        "",
        suite_table(suite, results),
    ])  # fmt: skip


def memory_markdown(results: dict[str, dict]) -> str:
    suite = MEMORY_SUITE
    logits_mb = suite.mini_batch * (suite.response_len + 1) * suite.model.vocab * 4 / 2**20
    base = results.get("full logits (before)", {}).get("peak_mb")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:100]}", "", ""])
            continue
        saved = f"{base - r['peak_mb']:.0f}" if base and name != "full logits (before)" else "-"
        rows.append([name, f"{r['peak_mb']:.0f}", saved, f"{r['step_s']:.1f}"])
    return "\n".join([
        "## PPO step memory, CPU (`bench/ppo.py`)",
        "",
        f"Device: {device_name()}. Peak RSS of a process that runs one PPO optimizer step of "
        f"run_ppo_with_peft.py (gae, LoRA r=8 actor and critic, {suite.samples} samples x {suite.response_len} "
        f"tokens, mini-batch {suite.mini_batch}, the pretraining loss on {suite.mini_batch} blocks of 128 tokens) "
        f"on a {shape_text(suite.model)} in float32, where one float32 [mini-batch, response, vocab] logits "
        f"tensor is {logits_mb:.0f} MB. Before: log-probs, entropy and the pretraining loss from the model's "
        "full-vocabulary logits (the bundle forced onto that path); after: the LM head on chunks of positions "
        "(rlhf/ppo/token_logprobs.py) and the chunked linear cross-entropy. Each row in its own process; the "
        "peak includes the model, the rollout and the Python runtime.",
        "",
        markdown_table(["variant", "peak RSS MB", "MB saved vs before", "s (one step, incl. warm-up)"], rows),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--suite", choices=list(SUITES) + [MEMORY_SUITE.name])
    parser.add_argument("--workdir")
    parser.add_argument(
        "--gpu-suite", action="store_true", help="the GPU suite (needs a GPU unless --cpu-small)"
    )
    parser.add_argument("--cpu-small", action="store_true", help="with --gpu-suite: tiny shapes on CPU")
    parser.add_argument("--results", help="write the sections here instead of bench/RESULTS.md")
    parser.add_argument(
        "--budget", type=float, default=GPU_BUDGET_S, help=f"seconds for --gpu-suite (default {GPU_BUDGET_S})"
    )
    parser.add_argument(
        "--rows",
        default=",".join(r for r in ROWS if r not in OPTIONAL_ROWS),
        help=f"comma list of rows to run: {', '.join(ROWS)} ({', '.join(OPTIONAL_ROWS)} only when named)",
    )
    args = parser.parse_args()
    if args.worker:
        if not torch.cuda.is_available():
            torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        suite = SUITES.get(args.suite, MEMORY_SUITE)
        result = run_in_worker(args.worker, suite, Path(args.workdir))
        if "step_s" in result:
            result["samples_per_s"] = result["samples"] / result["step_s"]
            result["peak_mb"] = harness.peak_memory_mb()
        print(json.dumps(result))
        return

    results_path = Path(args.results) if args.results else None
    unknown = [name for name in args.rows.split(",") if name and name not in ROWS]
    if unknown:  # before any model is built
        sys.exit(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    if args.gpu_suite and args.cpu_small:
        suite, sections = SUITES["cpu-small"], ["ppo-gpu-cpu-small"]
    elif args.gpu_suite or torch.cuda.is_available():
        if not torch.cuda.is_available():
            sys.exit("--gpu-suite needs a GPU (or --cpu-small for the tiny CPU run of the same code)")
        suite, sections = SUITES["gpu"], ["ppo-gpu"]
    else:
        suite, sections = SUITES["cpu"], ["ppo", "ppo-memory-cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [name for name in args.rows.split(",") if name]  # in the order given
        results = run_suite(suite, workdir, args.budget if suite.name == "gpu" else 3600, rows)
        markdown = {sections[0]: suite_markdown(suite, results)}
        if "ppo-memory-cpu" in sections:
            build(MEMORY_SUITE, workdir / "memory")
            memory = {
                v: run_worker(f"memory:{v}", MEMORY_SUITE, workdir / "memory", 1800) for v in MEMORY_VARIANTS
            }
            markdown["ppo-memory-cpu"] = memory_markdown(memory)
    for name, text in markdown.items():
        if suite.name != "cpu-small" or results_path is not None:
            update_section(name, text, *([results_path] if results_path else []))
        print(text)


if __name__ == "__main__":
    main()
