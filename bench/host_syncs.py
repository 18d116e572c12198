"""Host waits per PPO optimizer step, counted on CPU: what stalls a GPU's launch queue, measured without one.

A call that reads a tensor's value on the host (``.item()``, ``.tolist()``, ``bool``/``int``/``float`` of a
tensor, ``.cpu()``, ``.numpy()``, ``nonzero``, ``unique``, boolean-mask indexing) makes the host wait until the
GPU has run everything queued before it; the GPU then idles while the host prepares the next kernels. This
script runs ``run_ppo_with_peft.py`` for three optimizer steps on a tiny llama (hidden 64, 2 layers, float32,
LoRA r=8 actor and critic, the rollout engine running eagerly as on any CPU) under a ``TorchFunctionMode`` that
counts those calls in each phase of the second (steady) step: the generation (per decode step), the rest of
the rollout (scoring, forwards, advantages, statistics), the update (per mini-batch) and the optimizer step.
Calls inside ``torch.optim`` are left out (their step counters live on the host also on a GPU); a few counted
calls act on tensors that stay on the host on a GPU too (the prompt sampler's indices), so the counts are an
upper bound.

``python bench/host_syncs.py`` measures this checkout; ``--compare DIR`` also another checkout (e.g. a
``git worktree`` of an older commit), each in its own process, and writes the ``host-syncs-cpu`` section of
``bench/RESULTS.md`` with the rows of this run.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLES, MINI_BATCH, PROMPT_LEN, RESPONSE_LEN, GROUP = 16, 8, 16, 32, 8
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
         "unique", "unique_consecutive", "masked_select", "argwhere"}  # fmt: skip
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


def is_bool_index(index) -> bool:
    import torch

    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def worker(repo: Path, estimator: str, work: Path) -> dict:
    """Run the PPO command from ``repo`` under the counter; the counts of the second optimizer step."""
    sys.path[:0] = [str(repo), str(HERE)]
    import torch
    from torch.overrides import TorchFunctionMode

    torch.set_num_threads(1)
    from ppo_workers import Shape, build_llama, write_prompts
    from transformers import AutoTokenizer

    import rlhf
    import rlhf.generation.engine as engine
    import run_ppo_with_peft

    assert Path(rlhf.__file__).is_relative_to(repo), f"rlhf imported from {rlhf.__file__}, not {repo}"
    import rlhf.ppo.loop as loop
    from rlhf.backend.accelerate import AccelerateBackend

    model = build_llama(work / "model", Shape("tiny", 64, 176, 2, 4, 2, 512), torch.float32)
    prompts = write_prompts(work / "prompts", AutoTokenizer.from_pretrained(model), 4 * SAMPLES, PROMPT_LEN)
    phase, step, decode_steps = ["setup"], [0], collections.Counter()
    counts: collections.Counter = collections.Counter()  # (step, phase) -> reads
    sites: collections.Counter = collections.Counter()  # (step, phase, kind, where) -> reads

    def in_phase(owner, name: str, label: str, after=None) -> None:
        if not hasattr(owner, name):  # an older checkout without that function
            return
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            phase.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                phase.pop()
                if after:
                    after()

        setattr(owner, name, wrapped)

    in_phase(loop, "collect_rollout", "rollout")
    in_phase(engine.RolloutEngine, "_generate", "generation")
    in_phase(loop, "ppo_mini_batch_step", "update")
    in_phase(loop, "settle_mini_batches", "update")
    in_phase(AccelerateBackend, "step", "optimizer step", after=lambda: step.__setitem__(0, step[0] + 1))
    decode = engine.RolloutEngine._decode

    def counted_decode(self, *args, **kwargs):
        decode_steps[step[0]] += 1
        return decode(self, *args, **kwargs)

    engine.RolloutEngine._decode = counted_decode

    def where() -> str | None:
        """The innermost frame of this repository, or None inside torch.optim."""
        frame, ours = sys._getframe(2), None
        while frame is not None:
            name = frame.f_code.co_filename
            if "/torch/optim/" in name:
                return None
            if ours is None and name.startswith(str(repo)) and "/.venv/" not in name:
                ours = f"{Path(name).relative_to(repo)}:{frame.f_lineno}"
            frame = frame.f_back
        return ours or "?"

    class Counter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            kind = name if name in READS else None
            if name in INDEXING and len(args) > 1 and is_bool_index(args[1]):
                kind = f"{name}[bool mask]"
            if kind is not None:
                site = where()
                if site is not None:
                    counts[(step[0], phase[-1])] += 1
                    sites[(step[0], phase[-1], kind, site)] += 1
            return func(*args, **(kwargs or {}))

    k = GROUP if estimator == "grpo" else 1
    argv = [
        "--sft_model_path", str(model), "--dataset_dir", str(prompts), "--output_dir", str(work / "out"),
        "--reward_fn", "rlhf.toy_task:positivity_reward", "--critic_init", "sft",
        "--advantage_estimator", estimator, "--num_samples_per_prompt", str(k),
        "--per_device_train_batch_size", str(SAMPLES // k), "--per_device_mini_train_batch_size", str(MINI_BATCH),
        "--gradient_accumulation_steps", str(SAMPLES // MINI_BATCH), "--ppo_epochs", "1",
        "--max_prompt_length", str(PROMPT_LEN), "--max_response_length", str(RESPONSE_LEN),
        "--min_response_length", str(RESPONSE_LEN), "--max_steps", "3", "--logging_steps", "1",
        "--save_steps", "1000", "--actor_lora_rank", "8", "--critic_lora_rank", "8", "--seed", "0",
        "--generation_engine", "static", "--report_to", "none", "--disable_tqdm", "true",
        *(["--use_kl_loss"] if estimator == "grpo" else []),
    ]  # fmt: skip
    with Counter():
        run_ppo_with_peft.main(argv)
    steady = 1
    by_phase = {p: n for (s, p), n in counts.items() if s == steady}
    top = sorted(((n, p, kind, w) for (s, p, kind, w), n in sites.items() if s == steady), reverse=True)
    return {"phases": by_phase, "decode_steps": decode_steps[steady], "mini_batches": SAMPLES // MINI_BATCH,
            "sites": [[n, p, kind, w] for n, p, kind, w in top]}  # fmt: skip


def commit_of(repo: Path) -> str:
    run = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return run.stdout.strip() or "?"


def measure(repo: Path, estimator: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, __file__, "--worker", str(repo), "--estimator", estimator, "--work", work]
        run = subprocess.run(command, capture_output=True, text=True, cwd=repo)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        sys.exit(f"{repo} ({estimator}) failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[-1])


def row(label: str, estimator: str, result: dict) -> list[str]:
    phases = result["phases"]
    generation, rollout = phases.get("generation", 0), phases.get("rollout", 0)
    update, optimizer = phases.get("update", 0), phases.get("optimizer step", 0)
    total = generation + rollout + update + optimizer
    return [
        label, estimator, f"{generation} ({generation / max(result['decode_steps'], 1):.2f} per decode step)",
        str(rollout), f"{update} ({update / result['mini_batches']:g} per mini-batch)", str(optimizer), str(total),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="another checkout to measure in the same run (before)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--estimator", default="gae", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker.resolve(), args.estimator, args.work)))
        return
    from results_file import markdown_table, update_section

    checkouts = (
        [(f"before ({commit_of(args.compare)})", args.compare.resolve())] if args.compare else []
    ) + [(f"this checkout ({commit_of(ROOT)})", ROOT)]
    rows, details = [], []
    for label, repo in checkouts:
        for estimator in ("gae", "grpo"):
            result = measure(repo, estimator)
            rows.append(row(label, estimator, result))
            print(" | ".join(rows[-1]), flush=True)
            if repo == ROOT:
                details += [f"{estimator}: {n} x {kind} at {w} ({p})" for n, p, kind, w in result["sites"]]
    header = [
        "checkout",
        "estimator",
        "generation",
        "rest of the rollout",
        "update",
        "optimizer step",
        "total",
    ]
    update_section(
        "host-syncs-cpu",
        "## Host waits per PPO optimizer step, counted on CPU (`bench/host_syncs.py`)\n\n"
        f"{' '.join(__doc__.split(chr(10) + chr(10))[1].split()).replace('``', '`')} Per optimizer step: {SAMPLES} responses of "
        f"exactly {RESPONSE_LEN} tokens to prompts of <= {PROMPT_LEN} tokens (gae: {SAMPLES} prompts; grpo: "
        f"{SAMPLES // GROUP} prompts x K={GROUP}, --use_kl_loss), mini-batch {MINI_BATCH}, accumulation "
        f"{SAMPLES // MINI_BATCH}, one epoch.\n\n"
        + markdown_table(header, rows)
        + "\n\nWhat a wait costs on a GPU is not measured here: about the time the host then needs to queue the "
        "next kernels (tens of microseconds to a few milliseconds), so these counts are worth a few ms per step "
        "at most. Each forward over the base costs one or two in transformers' mask code "
        "(`bool` of the padding mask in `create_causal_mask`, seen at `rlhf/ppo/peft_models.py`'s `_hidden`)."
        "\n\nWhere this checkout's waits are (the second optimizer step):\n\n"
        + "\n".join(f"- {line}" for line in details)
        + "\n",
    )


if __name__ == "__main__":
    main()
