"""What the Trainer-stage benchmarks share: the benchmark model, workloads, isolated runs and their measurements.

Each implementation runs in its own Python process (``script --worker NAME``) so that its peak memory
(CUDA max allocated on GPU, max RSS on CPU) is its own; the worker prints one JSON line.

Variable-length workloads read ``../shared/data`` (GSM8K for SFT, Anthropic-HH for the reward model). The
benchmark tokenizer is a byte-level BPE trained on those texts (32,000 tokens on GPU, the model's vocabulary
size), so token counts are realistic for a 32k-vocabulary model; without the data the variable workloads
are skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; BENCH_SHARED_DATA names another copy (a GPU machine gets only the checkout)
SHARED_DATA = Path(os.environ.get("BENCH_SHARED_DATA") or ROOT.parent / "shared" / "data")
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
HH_PAIRS = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
# dense bf16 peak FLOP/s by device name (H100 SXM and H200 share the same tensor cores), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def peak_flops() -> float | None:
    """The dense bf16 peak of this GPU (None when unknown or on CPU)."""
    if not on_gpu():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def device_label() -> str:
    if on_gpu():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU (small llama, hidden 256, 4 layers; torch {torch.__version__}, one thread)"


def has_shared_data() -> bool:
    return GSM8K_TRAIN.is_file() and HH_PAIRS.is_file()


Shape = tuple[int, int, "int | None"]  # (batch, warm-up steps, timed steps); None timed = the whole data set


class Workloads:
    """A benchmark's workloads: ``fixed`` on a GPU or ``toy`` on CPU, plus the variable-length ``real`` one
    (read from ../shared/data) when it is there, whose shape differs between GPU and CPU."""

    def __init__(self, real: str, shapes: dict[str, Shape]) -> None:
        self.real, self.shapes = real, shapes  # shapes: toy, fixed, <real>_gpu, <real>_cpu

    def names(self, gpu: bool) -> list[str]:
        return (["fixed"] if gpu else ["toy"]) + ([self.real] if has_shared_data() else [])

    def shape(self, workload: str, gpu: bool) -> Shape:
        if workload == self.real:
            return self.shapes[f"{workload}_{'gpu' if gpu else 'cpu'}"]
        return self.shapes[workload]


def workload_texts() -> list[str]:
    """The GSM8K questions and answers and the HH transcripts, for the benchmark tokenizer."""
    texts = []
    for line in GSM8K_TRAIN.read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    with gzip.open(HH_PAIRS, "rt") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return texts


def cached_build(key: str, out: Path, build: Callable[[Path], object]) -> Path:
    """``build(out)``; with ``$BENCH_MODEL_CACHE`` set, ``out`` becomes a link to the one build of ``key``
    kept there (built on first use, published by an atomic rename). A GPU session's benchmarks all start
    from the same random-init models, whose builds are a noticeable share of a 15-minute lease."""
    cache = os.environ.get("BENCH_MODEL_CACHE")
    if not cache:
        build(out)
        return out
    stored = Path(cache) / key
    if not stored.is_dir():
        partial = Path(cache) / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            build(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(stored)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(stored.resolve(), target_is_directory=True)
    return out


def build_bench_model(out: Path) -> Path:
    """CPU: a small llama (hidden 256, 4 layers); GPU: TinyLlama-1.1B-shaped, random init, bf16.

    The tokenizer is trained on the workload texts when ``../shared/data`` is present (32,000 tokens on
    GPU, 2,048 on CPU), else on the repository's sample data. Cached by :func:`cached_build`.
    """
    key = f"bench-{'gpu' if on_gpu() else 'cpu'}-{'data' if has_shared_data() else 'sample'}"
    return cached_build(key, out, _build_bench_model)


def _build_bench_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from rlhf.tiny_models import REPO_ROOT, build_tiny_model

    vocab, data_root = 512, REPO_ROOT
    corpus = tempfile.TemporaryDirectory()
    if has_shared_data():
        vocab, data_root = (32000 if on_gpu() else 2048), Path(corpus.name)
        (data_root / "pt_data").mkdir()
        (data_root / "pt_data" / "corpus.txt").write_text("\n".join(workload_texts()))
    with corpus:
        if not on_gpu():
            small = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)
            return build_tiny_model("llama", out, vocab_size=vocab, data_root=data_root, **small)
        build_tiny_model("llama", out, vocab_size=vocab, data_root=data_root)  # for the tokenizer files
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init in seconds on the GPU (a minute on CPU)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def peak_memory_mb() -> float:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    from rlhf.ppo.memory import peak_rss_gb

    return peak_rss_gb() * 1024


def run_worker(
    script: str, name: str, workdir: Path, timeout: int = 3000, extra: tuple[str, ...] = ()
) -> dict:
    """Run ``script --worker name --workdir DIR [extra]`` in a fresh process; its last stdout line is JSON.

    On CPU the worker uses one thread: on a shared machine two OpenMP threads fighting other processes
    for the cores make timings swing tenfold. A failure (or timeout) is a result with an ``error``.
    """
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not on_gpu():
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, script, "--worker", name, "--workdir", str(workdir), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:  # a measurement printed before the limit is kept
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        result = last_json_line(name, partial)
        if "error" in result:
            return {"name": name, "error": f"timed out after {timeout} s"}
        return {**result, "note": f"what followed its measurement was cut at the {timeout} s limit"}
    if proc.returncode != 0:
        print_failure(name, proc.stderr)
        return {
            "name": name,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
        }
    return last_json_line(name, proc.stdout)


def last_json_line(name: str, stdout: str) -> dict:
    """The worker's result: the last line of its stdout that is a JSON object (a library may print after
    it); an error result when there is none, rather than a crash that loses the whole suite's section."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict):
            return result
    return {"name": name, "error": "no JSON result line on the worker's stdout"}


def print_failure(name: str, stderr: str, lines: int = 40) -> None:
    """The end of a failed worker's stderr, on this process's stderr (the table keeps only its last line)."""
    tail = "\n".join(stderr.strip().splitlines()[-lines:])
    print(f"--- worker {name} failed; the end of its stderr:\n{tail}\n---", file=sys.stderr, flush=True)


def run_alternating(
    script: str,
    names: list[str],
    workdir: Path,
    rounds: int = 2,
    key: str = "tokens_per_s",
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """Run the implementations in turn ``rounds`` times (A B A B) and keep each one's best run."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name in names:
            result = run_worker(script, name, workdir, extra=extra)
            if name not in best or ("error" not in result and result.get(key, 0) > best[name].get(key, 0)):
                best[name] = result
    return [best[name] for name in names]


def run_workloads(script: str, names: list[str], workloads: list[str], key: str = "tokens_per_s") -> dict:
    """``{workload: [result per implementation]}`` on one benchmark model built in a temp workdir.

    CPU: best of 2 alternating runs; GPU: one run each (timings there are steady)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_bench_model(workdir / "model")
        for workload in workloads:
            rounds = 1 if on_gpu() else 2
            results[workload] = run_alternating(script, names, workdir, rounds, key, ("--workload", workload))
    return results


class Deadline:
    """A wall-clock budget for a suite of runs: skip a run that would likely not finish in time.

    ``estimates`` (seconds per row name, e.g. from an earlier GPU session) say what a row needs; a row
    without one needs as long as the longest estimate-less run so far (at least 20 s). With one slow row
    (a cold ``torch.compile``) setting the bar for all, the quick rows after it were skipped while time
    was left for them."""

    def __init__(self, seconds: float, estimates: dict[str, float] | None = None):
        self.end = time.monotonic() + seconds
        self.estimates = estimates or {}
        self.longest = 0.0

    def left(self) -> float:
        return self.end - time.monotonic()

    def needs(self, name: str) -> float:
        return self.estimates.get(name, max(self.longest, 20.0))

    def run(self, script: str, name: str, workdir: Path, extra: tuple[str, ...] = ()) -> dict:
        """``run_worker`` unless the time left is less than the row needs (then a skipped result)."""
        needed = self.needs(name)
        if self.left() < needed:
            return {
                "name": name,
                "error": f"skipped: needs ~{needed:.0f} s, {max(self.left(), 0):.0f} s left",
            }
        start = time.monotonic()
        result = run_worker(script, name, workdir, timeout=max(int(self.left()), 1), extra=extra)
        if name not in self.estimates:
            self.longest = max(self.longest, time.monotonic() - start)
        return result


def report(result: dict) -> None:
    print(json.dumps(result), flush=True)


def model_flops_per_token(model: torch.nn.Module) -> float:
    """6 N (forward + backward) per token, N = non-embedding parameters (attention scores not counted)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6.0 * n


def compile_stats() -> dict:
    """``torch.compile``'s graphs and graph breaks in this process ({} when nothing was compiled): a
    compiled row that is slow because the model broke into pieces says so."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    if not graphs:
        return {}
    return {"graphs": graphs, "graph_breaks": sum(counters["graph_break"].values())}


def compile_note(result: dict) -> str:
    """ ", compiled: G graphs, B graph breaks" for a row that compiled, else ""."""
    if "graphs" not in result:
        return ""
    return f", compiled: {result['graphs']} graphs, {result['graph_breaks']} graph breaks"


def measurements(model: torch.nn.Module, tokens: int, seconds: float, steps: int) -> dict:
    """Real tokens/s, peak memory, (on a known GPU) MFU of ``steps`` timed steps and the compile stats."""
    result = {
        "tokens_per_s": tokens / seconds,
        "peak_mb": peak_memory_mb(),
        "steps": steps,
        **compile_stats(),
    }
    peak = peak_flops()
    if peak:
        result["mfu"] = result["tokens_per_s"] * model_flops_per_token(model) / peak
    return result


class CountingCollator:
    """Wrap a collator; remember the real tokens, the token slots (real + pad) and the rows of every batch
    it builds, in step order."""

    def __init__(self, inner):
        self.inner, self.tokens, self.slots, self.rows = inner, [], [], []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        self.slots.append(batch["input_ids"].numel())
        self.rows.append(len(features))
        return batch


def step_timer():
    """A TrainerCallback that records the wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def timed_totals(timer, collator: CountingCollator, warmup: int) -> tuple[int, float, int]:
    """(tokens, seconds, steps) of the steps after ``warmup`` (one batch per step)."""
    timed = len(timer.ends) - warmup
    seconds = timer.ends[-1] - timer.ends[warmup - 1]
    return sum(collator.tokens[warmup : warmup + timed]), seconds, timed


def section_text(title: str, script: str, batch: str, table: str, note: str = "") -> str:
    """A RESULTS.md section: what ran, on which device, how memory and MFU are measured, then the table."""
    gpu = on_gpu()
    peak = "CUDA max allocated" if gpu else "max RSS of the process (one thread; best of 2 alternating runs)"
    mfu = (
        "MFU = real tokens/s x 6 N / peak (N = non-embedding parameters; 989 TFLOP/s dense bf16 on H100/H200)"
        if gpu
        else "No MFU on CPU."
    )
    return (
        f"## {title} ({device_label()})\n\n"
        f"`{script}`: batch per step {batch}; AdamW, {'bf16' if gpu else 'fp32'}, no gradient checkpointing. "
        f"Peak MB: {peak}. {mfu} padding = share of pad slots in the batches.{' ' + note if note else ''}\n\n"
        f"{table}\n"
    )
