"""PPO benchmark: our run_ppo_with_peft.py against TRL on the same model, prompts, reward and shapes.

TRL 1.16 has no PPOTrainer, so the peer is its GRPOTrainer (LoRA, reference = adapters disabled, β > 0 so
it also computes reference log-probs). Both generate the same number of samples per optimizer step with
exactly ``RESPONSE`` new tokens each (min = max new tokens) and score them with the toy task's rule reward.
GRPO has no critic, so per sample it does less work than PPO (no value forward/backward).

Each implementation runs in its own process (``--worker NAME``) so its peak memory (max RSS on CPU, CUDA
max allocated on GPU) is its own. Writes the ``ppo`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT = (8, 8) if torch.cuda.is_available() else (4, 4)
SAMPLES = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
RESPONSE = 256 if torch.cuda.is_available() else 64
STEPS = 6  # the first one is warm-up and not counted


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(out: Path) -> Path:
    """CPU: a small llama (hidden 256, 4 layers, ~3 M parameters) with the repository tokenizer."""
    from rlhf.tiny_models import build_tiny_model

    return build_tiny_model("llama", out, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)


def worker_ours(workdir: Path) -> dict:
    import run_ppo_with_peft

    out = workdir / "ours"
    # fmt: off
    run_ppo_with_peft.main([
        "--sft_model_path", str(workdir / "model"), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(ROOT / "sft_data"), "--output_dir", str(out), "--critic_init", "sft",
        "--per_device_train_batch_size", str(SAMPLES), "--per_device_mini_train_batch_size", str(SAMPLES // 2),
        "--gradient_accumulation_steps", "2", "--ppo_epochs", "1",
        "--max_response_length", str(RESPONSE), "--min_response_length", str(RESPONSE),
        "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", "100000",
        "--actor_lora_rank", "8", "--critic_lora_rank", "8", "--kl_penalty_beta", "0.02",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
    ])
    # fmt: on
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    rollout = sum(m["time/rollout_s"] for m in lines) / len(lines)
    train = sum(m["time/train_s"] for m in lines) / len(lines)
    step = SAMPLES / (sum(m["samples_per_s"] for m in lines) / len(lines))  # end to end, logging included
    return {"rollout_s": rollout, "train_s": train, "step_s": step}


def worker_trl_grpo(workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.data import load_dataset_dir, render_prompt
    from rlhf.toy_task import positivity_reward

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model", padding_side="left")
    rows = load_dataset_dir(str(ROOT / "sft_data"), "prompt")
    dataset = Dataset.from_list([{"prompt": render_prompt(r, tokenizer)} for r in rows])

    def reward(prompts, completions, **_):
        return positivity_reward(prompts, completions)

    config = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=SAMPLES, num_generations=SAMPLES_PER_PROMPT,
        gradient_accumulation_steps=1, max_completion_length=RESPONSE, learning_rate=1e-4, beta=0.02,
        max_steps=STEPS, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        generation_kwargs={"min_new_tokens": RESPONSE}, bf16=torch.cuda.is_available(),
        disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora,
    )  # fmt: skip
    times: dict[str, list[float]] = {"rollout": [], "step": []}
    original = trainer._generate_and_score_completions

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        times["rollout"].append(time.perf_counter() - start)
        return result

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    trainer.train()
    step = sum(times["step"][1:]) / len(times["step"][1:])
    rollout = sum(times["rollout"][1:]) / len(times["rollout"][1:])
    return {"rollout_s": rollout, "train_s": step - rollout, "step_s": step}


def worker_trl_ppo(workdir: Path) -> dict:
    """TRL 0.25.1's PPOTrainer (four models: policy with LoRA, reference = adapter off, a reward model and
    a fully trained value model, both sequence classifiers of the same base)."""
    import trl
    import trl.trainer.ppo_trainer as ppo_module
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    from rlhf.data import load_dataset_dir, tokenize_prompt

    assert trl.__version__ == "0.25.1", trl.__version__
    model_dir = workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    rows = load_dataset_dir(str(ROOT / "sft_data"), "prompt")
    dataset = Dataset.from_list([{"input_ids": tokenize_prompt(r, tokenizer)} for r in rows])
    config = PPOConfig(
        output_dir=str(workdir / "trl-ppo"), per_device_train_batch_size=SAMPLES // 2,
        gradient_accumulation_steps=2, num_mini_batches=1, num_ppo_epochs=1, response_length=RESPONSE,
        total_episodes=SAMPLES * STEPS, learning_rate=1e-4, kl_coef=0.02, save_strategy="no",
        report_to="none", seed=0, logging_steps=1, num_sample_generations=0, bf16=torch.cuda.is_available(),
        local_rollout_forward_batch_size=SAMPLES, disable_tqdm=True,
    )  # fmt: skip
    scorer = lambda: AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)  # noqa: E731
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(model_dir),
        ref_model=None, reward_model=scorer(), value_model=scorer(), train_dataset=dataset, peft_config=lora,
    )  # fmt: skip
    times: dict[str, list[float]] = {"rollout": [], "step": []}
    original = ppo_module.batch_generation

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        times["rollout"].append(time.perf_counter() - start)
        return result

    ppo_module.batch_generation = timed

    class StepTimer(TrainerCallback):
        last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            times["step"].append(now - self.last)
            StepTimer.last = now

    trainer.add_callback(StepTimer())
    trainer.train()
    step = sum(times["step"][1:]) / len(times["step"][1:])
    rollout = sum(times["rollout"][1:]) / len(times["rollout"][1:])
    return {"rollout_s": rollout, "train_s": step - rollout, "step_s": step}


WORKERS = {
    "ours (run_ppo_with_peft.py, PPO)": worker_ours,
    "TRL 1.16 GRPOTrainer": worker_trl_grpo,
    "TRL 0.25.1 PPOTrainer": worker_trl_ppo,
}


def fetch_trl_025(workdir: Path) -> Path | None:
    """trl 0.25.1 unpacked into its own folder (``pip download --no-deps``), put first on PYTHONPATH for
    its worker only; the rest of the stack is this venv's. None when it cannot be fetched."""
    target = workdir / "trl-0.25.1"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), "trl==0.25.1"],
        capture_output=True, text=True,
    )  # fmt: skip
    wheels = list(target.glob("trl-0.25.1-*.whl"))
    if proc.returncode != 0 or not wheels:
        return None
    import zipfile

    zipfile.ZipFile(wheels[0]).extractall(target / "site")
    return target / "site"


def run_worker(name: str, workdir: Path, pythonpath: Path | None = None) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        if not torch.cuda.is_available():
            torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        result = WORKERS[args.worker](Path(args.workdir))
        result["samples_per_s"] = SAMPLES / result["step_s"]
        result["peak_mb"] = peak_memory_mb()
        print(json.dumps(result))
        return

    from results_file import markdown_table, update_section

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model")
        trl_025 = fetch_trl_025(workdir)
        results = {}
        for name in WORKERS:
            if name.startswith("TRL 0.25.1") and trl_025 is None:
                results[name] = {"error": "trl==0.25.1 could not be downloaded"}
                continue
            results[name] = run_worker(name, workdir, trl_025 if name.startswith("TRL 0.25.1") else None)
    ours = results["ours (run_ppo_with_peft.py, PPO)"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"][:80], "", "", "", "", ""])
            continue
        ratio = ours.get("samples_per_s", 0) / r["samples_per_s"] if "samples_per_s" in ours else float("nan")
        rows.append([
            name, f"{r['samples_per_s']:.2f}", f"{r['step_s']:.2f}", f"{r['rollout_s']:.2f}", f"{r['train_s']:.2f}",
            f"{r['peak_mb']:.0f}", f"{ratio:.2f}",
        ])  # fmt: skip
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.environ.get('BENCH_THREADS', '1')} thread)"
    )
    markdown = "\n".join([
        "## PPO (`bench/ppo.py`)",
        "",
        f"Device: {device}. Model: llama hidden 256, 4 layers (random init, vocab 512), LoRA r=8 on all linear "
        f"layers. Per optimizer step: {PROMPTS_PER_STEP} prompts x {SAMPLES_PER_PROMPT} samples = {SAMPLES} "
        f"responses of exactly {RESPONSE} tokens, toy rule reward, β = 0.02, mean of {STEPS - 1} steps after one "
        "warm-up step. Ours: PPO with critic (actor, critic, reference on one base), 2 mini-batches of "
        f"{SAMPLES // 2}, 1 PPO epoch. TRL 1.16 has no PPOTrainer; GRPOTrainer has no critic, so it does less "
        "work per sample. TRL 0.25.1 PPOTrainer (trl 0.25.1 on this venv's transformers/peft/accelerate) "
        "uses four models (LoRA policy, reference = adapter off, separate reward and fully trained value "
        "models) and scores with that reward model, not the rule; its rollout column is generation only (ours also holds scoring, the old and reference log-probs and the "
        "values; like TRL we take the old log-probs from the generation logits). Ours keeps LoRA dropout 0.05 on "
        "during updates; TRL's PPOTrainer disables dropout. "
        "Peak memory is the worker's max RSS on CPU. Timings on a shared 2-core machine are noisy. "
        "No GPU figures: this session had no GPU.",
        "",
        markdown_table(
            ["implementation", "samples/s", "s/step", "rollout s/step", "train s/step", "peak MB", "ours / this (samples/s)"],
            rows,
        ),
    ])  # fmt: skip
    update_section("ppo", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
