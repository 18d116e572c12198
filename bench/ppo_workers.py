"""What ``bench/ppo.py`` runs in its worker processes: the benchmark's models and prompts, and one run of each
implementation (ours through ``run_ppo_with_peft.py``, TRL 1.16's GRPOTrainer, TRL 0.25.1's PPOTrainer).

Every run gets the same model, prompts (``Suite.prompt_len`` tokens, the BOS included), response length
(min = max new tokens), samples per optimizer step, mini-batch and the toy task's rule reward (TRL's
PPOTrainer scores with a reward model of the same base: it takes no rule). A run returns seconds per
optimizer step after its first (warm-up) step: rollout, train and end to end.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
REWARD_FN = "rlhf.toy_task:positivity_reward"


@dataclass(frozen=True)
class Shape:
    """A llama architecture (random init)."""

    label: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class Suite:
    """One benchmark configuration: shapes, batch sizes and lengths shared by every implementation."""

    name: str
    model: Shape
    large: Shape | None  # ours once more on a larger base: actor, critic and reward adapters
    samples: int  # responses per optimizer step
    group: int  # K, responses per prompt of the group estimators
    mini_batch: int
    prompt_len: int
    response_len: int
    large_batch: int
    steps: int  # optimizer steps per run; the first is warm-up
    trl_ppo_micro_batch: int
    dtype: str  # "bfloat16" on GPU

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def build_llama(out: Path, shape: Shape, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A random-init llama of ``shape`` with the repository tokenizer (512 tokens; a larger model
    vocabulary is only never sampled by the tokenizer's words)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(512, ROOT)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # a 7B model initialises in seconds on a GPU, minutes on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def write_reward_adapter(model_dir: Path, out: Path, rank: int = 8) -> Path:
    """A reward adapter as ``run_rm_with_peft.py`` writes it (SEQ_CLS LoRA + ``score``), random weights,
    built on the meta device so a 7B base is never materialised."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=32, target_modules=TARGETS,
                      modules_to_save=["score"])  # fmt: skip
    peft = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in get_peft_model_state_dict(peft).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    lora.base_model_name_or_path = str(model_dir)
    lora.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"))
    return out


def write_prompts(out: Path, tokenizer, count: int, prompt_len: int, seed: int = 0) -> Path:
    """``count`` prompts of at most ``prompt_len`` tokens (most exactly), words of the repository's SFT data."""
    from rlhf.data import load_dataset_dir

    words = " ".join(r["response"] for r in load_dataset_dir(str(ROOT / "sft_data"), "sft")).split()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        picked: list[str] = []
        while len(tokenizer(" ".join(picked))["input_ids"]) < prompt_len:
            picked.append(rng.choice(words))
        while len(tokenizer(" ".join(picked))["input_ids"]) > prompt_len:
            picked.pop()
        rows.append({"prompt": " ".join(picked)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def build(suite: Suite, workdir: Path, large: bool = False) -> None:
    """The suite's model (or its large model and reward adapter) and the prompts, into ``workdir``."""
    from harness import cached_build
    from transformers import AutoTokenizer

    dtype, device = suite.torch_dtype, ("cuda" if suite.bf16 else "cpu")
    shape = suite.large if large else suite.model
    key = "ppo-" + "-".join(str(v) for v in vars(shape).values()).replace(" ", "_") + f"-{suite.dtype}"
    model_dir = cached_build(key, workdir / ("large" if large else "model"),
                             lambda out: build_llama(out, shape, dtype, device))  # fmt: skip
    if large:
        write_reward_adapter(model_dir, workdir / "large-rm")
        return
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    write_prompts(workdir / "prompts", tokenizer, 8 * suite.samples, suite.prompt_len)


def per_step(values: list[float]) -> float:
    """Mean over the steps after the first (warm-up)."""
    timed = values[1:] or values
    return sum(timed) / len(timed)


def ours(
    suite: Suite,
    workdir: Path,
    estimator: str,
    large: bool = False,
    checkpointing: bool = True,
    extra=(),
    tag="",
) -> dict:
    """``run_ppo_with_peft.py`` with LoRA r=8 actor (and critic for gae), by default with
    ``--gradient_checkpointing`` (TRL's GRPOTrainer checkpoints by default too)."""
    import run_ppo_with_peft

    samples = suite.large_batch if large else suite.samples
    k = suite.group if estimator != "gae" else 1
    mini = min(suite.mini_batch, samples)
    out = workdir / (tag or f"ours-{estimator}{'-large' if large else ''}")
    reward = (
        ["--reward_lora_path", str(workdir / "large-rm")]  # the critic starts from it (--critic_init reward)
        if large
        else ["--reward_fn", REWARD_FN, "--critic_init", "sft"]
    )
    # fmt: off
    argv = [
        "--sft_model_path", str(workdir / ("large" if large else "model")), "--dataset_dir", str(workdir / "prompts"),
        "--output_dir", str(out), "--advantage_estimator", estimator, "--num_samples_per_prompt", str(k),
        "--per_device_train_batch_size", str(samples // k), "--per_device_mini_train_batch_size", str(mini),
        "--gradient_accumulation_steps", str(samples // mini), "--ppo_epochs", "1",
        "--max_prompt_length", str(suite.prompt_len), "--max_response_length", str(suite.response_len),
        "--min_response_length", str(suite.response_len), "--max_steps", str(suite.steps), "--logging_steps", "1",
        "--save_steps", "1000000", "--actor_lora_rank", "8", "--critic_lora_rank", "8", "--kl_penalty_beta", "0.02",
        "--actor_lora_dropout", "0.05", "--critic_lora_dropout", "0.05",  # as the TRL rows' LoraConfig
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *reward, *extra,
    ]
    # fmt: on
    if estimator != "gae":  # as TRL's GRPOTrainer: the KL in the loss (then the update is on-policy)
        argv.append("--use_kl_loss")
    if checkpointing:
        argv.append("--gradient_checkpointing")
    if suite.bf16:
        argv += ["--bf16", "--torch_dtype", "bfloat16"]
    run_ppo_with_peft.main(argv)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = samples / per_step([r["samples_per_s"] for r in rows])  # end to end, logging included
    profiled = sorted((out / "profile").glob("step_*.txt")) if (out / "profile").is_dir() else []
    rollout, train = (
        per_step([r["time/rollout_s"] for r in rows]),
        per_step([r["time/train_s"] for r in rows]),
    )
    # the parts of a step within the step (means over the same rows): else a timer is broken
    mean_step = per_step([samples / r["samples_per_s"] for r in rows])
    if rollout + train > 1.1 * mean_step:
        raise RuntimeError(
            f"the loop's timings do not fit its step: rollout {rollout:.3f} s + train {train:.3f} s > step "
            f"{mean_step:.3f} s (from samples_per_s); a broken timer, not a measurement"
        )
    return {
        # --profile_step's device time by kind of kernel (its file's first lines), into this row's JSON line
        **({"profile": profiled[0].read_text().splitlines()[:4]} if profiled else {}),
        "rollout_s": rollout,
        "generate_s": per_step([r["time/generate_per_rollout_s"] for r in rows]),
        "loop_peak_gb": rows[-1].get("memory/peak_gb"),  # the loop's own metric (GPU only)
        "train_s": train,
        "step_s": step,
        "first_step_s": samples / rows[0]["samples_per_s"],  # the warm-up step: compiles, graph captures
        "samples": samples,
    }


def prompt_dataset(workdir: Path, tokenizer, ids: bool, prompt_len: int):
    """The benchmark prompts as a ``datasets.Dataset``: text (GRPO) or token ids, last ``prompt_len`` (PPO)."""
    from datasets import Dataset

    from rlhf.data import load_dataset_dir, tokenize_prompt

    rows = load_dataset_dir(str(workdir / "prompts"), "prompt")
    if ids:
        return Dataset.from_list([{"input_ids": tokenize_prompt(r, tokenizer)[-prompt_len:]} for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"]} for r in rows])


def train_timed(trainer, owner, rollout_fn: str, samples: int) -> dict:
    """``trainer.train()`` with ``owner.<rollout_fn>`` (its generation) and each optimizer step timed (CUDA
    synchronised); per-step means after the warm-up step."""
    from transformers import TrainerCallback

    times: dict[str, list[float]] = {"rollout": [], "step": []}
    original = getattr(owner, rollout_fn)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        times["rollout"].append(time.perf_counter() - start)
        return result

    class StepTimer(TrainerCallback):
        last = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            times["step"].append(now - StepTimer.last)
            StepTimer.last = now

    setattr(owner, rollout_fn, timed)
    trainer.add_callback(StepTimer())
    trainer.train()
    step, rollout = per_step(times["step"]), per_step(times["rollout"])
    return {"rollout_s": rollout, "train_s": step - rollout, "step_s": step, "samples": samples}


def trl_grpo(suite: Suite, workdir: Path) -> dict:
    """TRL 1.16 GRPOTrainer: LoRA r=8, K = ``suite.group``, reference = adapters off (β = 0.02), its default
    gradient checkpointing; one generation of ``suite.samples`` completions per optimizer step."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.toy_task import positivity_reward

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model", padding_side="left")
    mini = min(suite.mini_batch, suite.samples)
    config = GRPOConfig(
        output_dir=str(workdir / "trl-grpo"), per_device_train_batch_size=mini,
        gradient_accumulation_steps=suite.samples // mini, num_generations=suite.group,
        max_completion_length=suite.response_len, learning_rate=1e-4, beta=0.02, max_steps=suite.steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, bf16=suite.bf16, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": suite.response_len},
        gradient_checkpointing=False,  # TRL 1.16 defaults to True; ours-*-fast rows run without it
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=suite.torch_dtype),
        reward_funcs=lambda prompts, completions, **_: positivity_reward(prompts, completions),
        args=config, train_dataset=prompt_dataset(workdir, tokenizer, False, suite.prompt_len),
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    return train_timed(trainer, trainer, "_generate_and_score_completions", suite.samples)


def trl_ppo(suite: Suite, workdir: Path) -> dict:
    """TRL 0.25.1's PPOTrainer: LoRA r=8 policy, reference = adapter off, a reward model and a fully trained
    value model (sequence classifiers of the same base); micro-batch ``suite.trl_ppo_micro_batch``."""
    import trl
    import trl.trainer.ppo_trainer as ppo_module
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import PPOConfig, PPOTrainer

    assert trl.__version__ == "0.25.1", trl.__version__
    model_dir = workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    micro = min(suite.trl_ppo_micro_batch, suite.samples)
    config = PPOConfig(
        output_dir=str(workdir / "trl-ppo"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=suite.samples // micro, num_mini_batches=1, num_ppo_epochs=1,
        response_length=suite.response_len, total_episodes=suite.samples * suite.steps, learning_rate=1e-4,
        kl_coef=0.02, save_strategy="no", report_to="none", seed=0, logging_steps=1, num_sample_generations=0,
        bf16=suite.bf16, local_rollout_forward_batch_size=suite.samples, disable_tqdm=True,  # all at once, as ours
    )  # fmt: skip
    scorer = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        model_dir, num_labels=1, dtype=suite.torch_dtype
    )
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=suite.torch_dtype),
        ref_model=None, reward_model=scorer(), value_model=scorer(), peft_config=lora,
        train_dataset=prompt_dataset(workdir, tokenizer, True, suite.prompt_len),
    )  # fmt: skip
    return train_timed(trainer, ppo_module, "batch_generation", suite.samples)


MEMORY_SHAPE = Shape("tiny llama, vocab 32000", 64, 176, 2, 4, 2, 32000)
MEMORY_SUITE = Suite(
    "cpu-memory", MEMORY_SHAPE, None, samples=32, group=1, mini_batch=32, prompt_len=32, response_len=128,
    large_batch=0, steps=1, trl_ppo_micro_batch=0, dtype="float32",
)  # fmt: skip
MEMORY_VARIANTS = {  # name -> (full-vocabulary logits, --gradient_checkpointing)
    "full logits (before)": (True, False),
    "chunked (after)": (False, False),
    "chunked + --gradient_checkpointing": (False, True),
}


def memory_run(workdir: Path, variant: str) -> dict:
    """One PPO optimizer step (gae, 32 samples x 128 tokens, the pretraining loss on 32 blocks of 128 tokens)
    on the vocabulary-32000 model. ``full logits (before)`` forces the models bundle onto the model's own
    full-vocabulary forward for log-probs, entropy and the pretraining loss: the code before chunking."""
    from rlhf.ppo.peft_models import PeftPolicyModels

    full, checkpointing = MEMORY_VARIANTS[variant]
    if full:
        PeftPolicyModels._plain_head = staticmethod(lambda model: None)
    extra = (
        "--pretrain_dataset_dir",
        str(ROOT / "pt_data"),
        "--block_size",
        "128",
        "--pretrain_warmup_steps",
        "0",
    )
    tag = f"memory-{list(MEMORY_VARIANTS).index(variant)}"
    return ours(MEMORY_SUITE, workdir, "gae", checkpointing=checkpointing, extra=extra, tag=tag)
