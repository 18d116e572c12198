"""What the Trainer-stage benchmarks share: the benchmark model, isolated runs and their measurements.

Each implementation runs in its own Python process (``script --worker NAME``) so that its peak memory
(CUDA max allocated on GPU, max RSS on CPU) is its own; the worker prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# H100 SXM dense bf16 peak, for MFU
PEAK_FLOPS = {"cuda": 989e12}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def build_bench_model(out: Path) -> Path:
    """CPU: a small llama (hidden 256, 4 layers); GPU: TinyLlama-1.1B-shaped, random init."""
    sys.path.insert(0, str(ROOT))
    from rlhf.tiny_models import build_tiny_model

    if not on_gpu():
        return build_tiny_model("llama", out, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    build_tiny_model("llama", out)  # for the tokenizer files
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


def peak_memory_mb() -> float:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, name: str, workdir: Path, timeout: int = 3000) -> dict:
    """Run ``script --worker name --workdir DIR`` in a fresh process; its last stdout line is JSON.

    On CPU the worker uses one thread: on a shared machine two OpenMP threads fighting other processes
    for the cores make timings swing tenfold.
    """
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not on_gpu():
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, script, "--worker", name, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return {
            "name": name,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_alternating(
    script: str, names: list[str], workdir: Path, rounds: int = 2, key: str = "tokens_per_s"
) -> list[dict]:
    """Run the implementations in turn ``rounds`` times (A B A B) and keep each one's best run."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name in names:
            result = run_worker(script, name, workdir)
            if name not in best or ("error" not in result and result.get(key, 0) > best[name].get(key, 0)):
                best[name] = result
    return [best[name] for name in names]


def report(result: dict) -> None:
    print(json.dumps(result), flush=True)


def model_flops_per_token(model: torch.nn.Module) -> float:
    """6 N (forward + backward) per token, N = non-embedding parameters."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6.0 * n


class CountingCollator:
    """Wrap a collator; remember the real tokens (and rows) of every batch it builds, in step order."""

    def __init__(self, inner):
        self.inner, self.tokens, self.rows = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
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
