"""``eval_loss`` of the SFT and reward-model stages: the value over all held-out rows, whatever the number
of processes and the eval batch size.

Trainer's own value (one mean per batch, repeated per row) moved with both when the 11 held-out rows did
not fill the last batches: SFT 5.2331 (1 process, eval batch 4), 5.2576 (2 processes) and 5.2274
(3 processes) for a true mean token cross-entropy of 5.2334; the reward model 0.4959 on 1 process and
0.4921 on 2 or 3. Each checkpoint is the tiny llama trained a few steps, so the rows' losses differ.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launch import GLOO_THREADS_AFTER, freed_process_groups, script_env, torchrun
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    TrainingArguments,
)

import run_rm_with_peft
import run_sft_with_peft
from rlhf.args import DataArguments
from rlhf.models import load_tokenizer
from rlhf.reward import PairCollator, RewardArguments, pairwise_loss, sequence_rewards
from rlhf.reward.stage import build_reward_data
from rlhf.sft.batching import PaddedCollator, packed_collator
from rlhf.sft.stage import build_sft_data
from rlhf.training.fused_loss import output_projection
from rlhf.training.packed_attention import use_packed_attention

SPLIT = ["--split_ratio", "0.0344", "--seed", "7"]  # 11 of the 320 rows of sft_data and of rm_data
CENTER = 0.1  # --center_rewards_coefficient: the centring term is part of the reward model's eval_loss


def common_argv(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_dir", str(data), "--output_dir", str(out),
        "--lora_rank", "-1", "--report_to", "none", "--save_strategy", "no", "--data_cache_dir", str(cache),
        *extra,
    ]  # fmt: skip


def train_argv(model: Path, data: Path, out: Path, cache: Path, max_steps: int) -> list[str]:
    return common_argv(model, data, out, cache, "--do_train", "--per_device_train_batch_size", "8",
                       "--max_steps", str(max_steps), "--learning_rate", "3e-3", "--split_ratio", "0")  # fmt: skip


def eval_argv(model: Path, data: Path, out: Path, cache: Path, batch: int, *extra: str) -> list[str]:
    return common_argv(model, data, out, cache, "--do_eval", "--per_device_eval_batch_size", str(batch),
                       *SPLIT, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_llama, repo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "model"
    run_sft_with_peft.main(train_argv(tiny_llama, repo_root / "sft_data", out, out.parent / "cache", 6))
    return out


@pytest.fixture(scope="module")
def rm_checkpoint(tiny_llama, repo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "model"
    run_rm_with_peft.main(train_argv(tiny_llama, repo_root / "rm_data", out, out.parent / "cache", 8))
    return out


def true_sft_loss(model_dir: Path, data: Path, cache: Path) -> float:
    """Mean token cross-entropy over the learned tokens of the held-out rows: one plain forward per row."""
    tokenizer = load_tokenizer(str(model_dir), False, padding_side="right")
    data_args = DataArguments(dataset_dir=str(data), data_cache_dir=str(cache), split_ratio=0.0344)
    args = TrainingArguments(output_dir=str(cache / "scratch"), seed=7, report_to="none")
    _, held_out = build_sft_data(data_args, tokenizer, args)
    assert len(held_out) == 11
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in held_out:
            logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            tokens += int(keep.sum())
    return total / tokens


def true_rm_loss(model_dir: Path, data: Path, cache: Path) -> float:
    """The training loss (:func:`pairwise_loss`, centring included) on all held-out pairs at once."""
    tokenizer = load_tokenizer(str(model_dir), False, padding_side="right")
    data_args = DataArguments(dataset_dir=str(data), data_cache_dir=str(cache), split_ratio=0.0344)
    args = TrainingArguments(output_dir=str(cache / "scratch"), seed=7, report_to="none")
    _, held_out = build_reward_data(data_args, RewardArguments(), tokenizer, args)
    assert len(held_out) == 11
    batch = PairCollator(tokenizer.pad_token_id)(held_out.to_list())
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        chosen, rejected = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    return pairwise_loss(chosen.double(), rejected.double(), batch["margin"], CENTER).item()


@pytest.mark.parametrize(
    "extra", [[], ["--packing"], ["--fused_loss", "off"]], ids=["padded", "packed", "model_loss"]
)
def test_sft_eval_loss_is_the_token_mean_for_any_eval_batch(sft_checkpoint, repo_root, tmp_path, extra):
    data, cache = repo_root / "sft_data", tmp_path / "cache"
    expected = true_sft_loss(sft_checkpoint, data, cache)
    for batch in (1, 4):
        out = tmp_path / f"eval{batch}"
        metrics = run_sft_with_peft.main(eval_argv(sft_checkpoint, data, out, cache, batch, *extra))
        assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6), batch


def test_reward_eval_loss_is_the_loss_on_all_pairs_for_any_eval_batch(rm_checkpoint, repo_root, tmp_path):
    data, cache = repo_root / "rm_data", tmp_path / "cache"
    expected = true_rm_loss(rm_checkpoint, data, cache)
    for batch in (1, 4):
        argv = eval_argv(rm_checkpoint, data, tmp_path / f"eval{batch}", cache, batch)
        metrics = run_rm_with_peft.main([*argv, "--center_rewards_coefficient", str(CENTER)])
        assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6), batch


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_processes_report_the_one_process_eval_loss(
    stage, sft_checkpoint, rm_checkpoint, repo_root, tmp_path
):
    """torchrun, 2 processes (gloo), eval batch 4: 3 batches of the 11 rows and a fourth of copies to even
    them out; the value is the directly computed one, which the one-process runs above report. SFT packed
    (one row per batch, split per example), the reward model with centring."""
    if stage == "sft":
        model, script, extra = sft_checkpoint, "run_sft_with_peft.py", ["--packing"]
        expected = true_sft_loss(model, repo_root / "sft_data", tmp_path / "cache")
    else:
        model, script = rm_checkpoint, "run_rm_with_peft.py"
        extra = ["--center_rewards_coefficient", str(CENTER)]
        expected = true_rm_loss(model, repo_root / "rm_data", tmp_path / "cache")
    data, out = repo_root / f"{stage}_data", tmp_path / "ddp"
    argv = eval_argv(model, data, out, tmp_path / "cache", 4, "--ddp_backend", "gloo", *extra)
    proc = subprocess.run([*torchrun(2), str(GLOO_THREADS_AFTER), str(repo_root / script), *argv], cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert freed_process_groups(proc.stderr, 2), proc.stderr[-3000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_example_losses_match_cross_entropy_per_example(tiny_llama, epsilon):
    """Hidden states + lm_head, logits, and one packed row: the same per-example sums as
    ``F.cross_entropy`` (its ``label_smoothing`` is Trainer's ``LabelSmoother``) on each example alone."""
    from rlhf.sft.evaluation import lm_example_losses

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    examples = []
    for length, prompt in [(9, 4), (5, 1), (12, 7)]:
        ids = torch.randint(3, model.config.vocab_size, (length,))
        examples.append({"input_ids": ids.tolist(), "labels": [-100] * prompt + ids[prompt:].tolist()})
    expected = []
    with torch.no_grad():
        for example in examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            keep = targets != -100
            loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum", label_smoothing=epsilon)
            expected.append([loss.item(), int(keep.sum())])
        padded = PaddedCollator(pad_token_id=0)(examples)
        outputs = model(
            padded["input_ids"], attention_mask=padded["attention_mask"], output_hidden_states=True
        )
        from_hidden = lm_example_losses(padded, outputs.hidden_states[-1], output_projection(model), epsilon)
        from_logits = lm_example_losses(padded, outputs.logits, None, epsilon)
        packed = packed_collator(use_packed_attention(model))(examples)  # last: changes the model's attention
        logits = model(**{key: value for key, value in packed.items() if key != "labels"}).logits
        from_packed = lm_example_losses(packed, logits, None, epsilon)
    for got in (from_hidden, from_logits, from_packed):
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-4)
