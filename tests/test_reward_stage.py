"""run_rm_with_peft.py end to end on a tiny model: the reference command, reloading, learning, errors."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file
from test_model_loading import float16_copy
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from rlhf.args import DataArguments, LoraArguments, ModelArguments
from rlhf.reward import PairCollator, RewardArguments, load_reward_model, sequence_rewards
from rlhf.reward.stage import build_reward_data, build_reward_model
from rlhf.reward.trainer import RewardTrainer
from run_rm_with_peft import main

# The step-2 command of the reference README, flag for flag (paths are filled in by the tests).
SEED_FLAGS = """
--model_type llama --model_name_or_path {model} --dataset_dir {data} --split_ratio 0.01
--data_cache_dir {cache} --per_device_train_batch_size 2 --per_device_eval_batch_size 2
--dataloader_num_workers 16 --gradient_accumulation_steps 8 --do_train --do_eval --seed 512 --fp16
--num_train_epochs 1 --max_length 1024 --learning_rate 1e-5 --warmup_ratio 0.05 --weight_decay 0.01
--logging_strategy steps --evaluation_strategy steps --logging_steps 10 --save_strategy steps
--save_total_limit 1 --eval_steps 10 --save_steps 10 --block_size 512 --output_dir {out} --overwrite_output_dir
--logging_first_step True --lora_rank 8 --lora_alpha 32
--lora_target q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --lora_dropout 0.05
--torch_dtype float16 --report_to wandb
"""
SHARED_HH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
)


def quick_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_dir", str(data), "--output_dir", str(out),
        "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--max_steps", "4", "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no",
        "--split_ratio", "0.1", "--logging_steps", "1", "--max_length", "128", "--block_size", "64",
        "--data_cache_dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def eval_rewards(
    model, tokenizer_dir: Path, data: Path, out: Path, padding_side: str = "right"
) -> torch.Tensor:
    """(N, 2) rewards of the held-out pairs of ``quick_argv`` (same split), scored by ``model``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_args = DataArguments(dataset_dir=str(data), split_ratio=0.1, block_size=64)
    args = TrainingArguments(output_dir=str(out / "scratch"), report_to="none")
    _, held_out = build_reward_data(data_args, RewardArguments(max_length=128), tokenizer, args)
    batch = PairCollator(tokenizer.pad_token_id, padding_side)(held_out.to_list())
    with torch.no_grad():
        return sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).view(2, -1).T


def test_seed_command_under_torchrun(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "rm_lora"
    argv = SEED_FLAGS.format(
        model=tiny_llama, data=repo_root / "rm_data", out=out, cache=tmp_path / "c"
    ).split()
    cmd = torchrun(1)
    cmd += [str(repo_root / "run_rm_with_peft.py"), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [row for row in state["log_history"] if "eval_accuracy" in row]
    assert evals and all("eval_margin" in row for row in evals)
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 10, 20]
    assert (out / "checkpoint-20" / "adapter_model.safetensors").is_file()


def test_lora_reward_model_reloads_with_plain_peft_and_scores_as_in_training(tiny_llama, repo_root, tmp_path):
    from peft import PeftModel

    out = tmp_path / "rm"
    metrics = main(
        quick_argv(
            tiny_llama, repo_root / "rm_data", out, "--lora_rank", "8", "--lora_target", "q_proj,v_proj"
        )
    )
    weights = load_file(out / "adapter_model.safetensors")
    assert any("score" in key for key in weights), sorted(weights)
    assert "score" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]

    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    untrained_score = base.score.weight.clone()
    model = PeftModel.from_pretrained(base, out).eval()
    rewards = eval_rewards(model, out, repo_root / "rm_data", tmp_path)
    assert rewards[:, 0].mean().item() == pytest.approx(metrics["eval_reward_chosen"], abs=1e-4)
    assert rewards[:, 1].mean().item() == pytest.approx(metrics["eval_reward_rejected"], abs=1e-4)
    assert (rewards[:, 0] > rewards[:, 1]).float().mean().item() == pytest.approx(metrics["eval_accuracy"])
    merged = model.merge_and_unload()
    assert not torch.equal(merged.score.weight, untrained_score)  # the trained head was loaded
    ids = torch.tensor([[1, 60, 70, 80, 2]])
    with torch.no_grad():  # plain transformers pooling agrees with ours on an unpadded sequence
        assert merged(ids).logits[0, 0].item() == pytest.approx(
            sequence_rewards(merged, ids, torch.ones_like(ids)).item(), abs=1e-5
        )
    again = load_reward_model(str(out))
    torch.testing.assert_close(
        eval_rewards(again, out, repo_root / "rm_data", tmp_path, "left"), rewards, atol=1e-4, rtol=1e-4
    )


def test_full_reward_model_learns_the_toy_preference(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "rm_full"
    argv = quick_argv(tiny_llama, repo_root / "rm_data", out, "--lora_rank", "-1", "--fp16")
    argv[argv.index("--max_steps") + 1] = "30"
    argv[argv.index("--per_device_train_batch_size") + 1] = "16"
    metrics = main([*argv, "--warmup_steps", "0.1", "--center_rewards_coefficient", "0.01"])
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_margin"] > 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.num_labels == 1
    rewards = eval_rewards(plain, out, repo_root / "rm_data", tmp_path)
    assert rewards[:, 0].mean().item() == pytest.approx(metrics["eval_reward_chosen"], abs=1e-4)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_accuracy" in row for row in state["log_history"])


def test_missing_field_is_a_one_line_error(tiny_llama, tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "pairs.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
    )
    with pytest.raises(SystemExit) as exc:
        main(quick_argv(tiny_llama, data, tmp_path / "out"))
    assert exc.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f'error: {data / "pairs.jsonl"}:2: missing field "rejected"'
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_margin_is_a_one_line_error_before_training(tiny_llama, tmp_path, capsys, literal):
    data = tmp_path / "pairs"
    data.mkdir()
    rows = '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1}\n' * 3
    rows += '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": ' + literal + "}\n"
    (data / "pairs.jsonl").write_text(rows)
    with pytest.raises(SystemExit) as exc:
        main(quick_argv(tiny_llama, data, tmp_path / "out"))
    assert exc.value.code == 2
    number = "nan" if literal == "NaN" else "inf"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'error: {data / "pairs.jsonl"}:4: field "margin" is {number} (numbers in data must be finite)'
    )
    assert not (tmp_path / "out").exists()


def test_reward_flags_checked_up_front_and_non_finite_loss_stops(
    tiny_llama, repo_root, tmp_path, capsys, monkeypatch
):
    file_out = tmp_path / "out.txt"
    file_out.write_text("x")
    for argv, expected in [
        (quick_argv(tiny_llama, repo_root / "rm_data", file_out), f"--output_dir {file_out} is a file"),
        (quick_argv(tiny_llama, repo_root / "rm_data", tmp_path / "o", "--per_device_train_batch_size", "0"),
         "--per_device_train_batch_size must be a positive number, got 0"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()

    monkeypatch.setattr(
        RewardTrainer, "compute_loss", lambda self, *a, **k: torch.tensor(float("inf"), requires_grad=True)
    )
    out = tmp_path / "inf"
    with pytest.raises(SystemExit) as exc:
        main(quick_argv(tiny_llama, repo_root / "rm_data", out, "--lora_rank", "4"))
    assert exc.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("error: non-finite training loss (inf) at step 1; stopped before its update")
    )
    assert not (out / "adapter_model.safetensors").exists()


def test_same_seed_builds_the_same_adapter_and_score_head(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def trainable(seed: int) -> dict[str, torch.Tensor]:
        args = TrainingArguments(output_dir=str(tmp_path), seed=seed, report_to="none")
        model = build_reward_model(
            ModelArguments(model_name_or_path=str(tiny_llama)), LoraArguments(lora_rank=4), tokenizer, args
        )
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    first, again, other = trainable(5), trainable(5), trainable(6)
    assert any("score" in k for k in first) and any("lora_A" in k for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "score" in k)


def test_full_reward_model_of_a_float16_checkpoint_under_auto_trains_float32_weights(tiny_llama, tmp_path):
    path = float16_copy(tiny_llama, tmp_path / "fp16")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    model = build_reward_model(
        ModelArguments(model_name_or_path=str(path)),
        LoraArguments(lora_rank=-1),
        AutoTokenizer.from_pretrained(path),
        args,
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_peft_path_to_an_sft_adapter_names_its_task_type(tiny_llama, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.errors import CheckpointError

    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM),
    )
    sft.save_pretrained(tmp_path / "sft_adapter")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    model_args = ModelArguments(model_name_or_path=str(tiny_llama), peft_path=str(tmp_path / "sft_adapter"))
    with pytest.raises(
        CheckpointError, match=r"sft_adapter: a CAUSAL_LM adapter .* continues SEQ_CLS adapters"
    ):
        build_reward_model(model_args, LoraArguments(), AutoTokenizer.from_pretrained(tiny_llama), args)


@pytest.mark.slow
def test_two_process_torchrun(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "ddp"
    argv = quick_argv(tiny_llama, repo_root / "rm_data", out, "--lora_rank", "4", "--ddp_backend", "gloo")
    cmd = torchrun(2)
    proc = subprocess.run([*cmd, str(repo_root / "run_rm_with_peft.py"), *argv], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("score" in k for k in load_file(out / "adapter_model.safetensors"))
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_HH.is_file(), reason="../shared/data/hh-rlhf is absent")
def test_real_hh_harmless_pairs(tiny_llama, tmp_path):
    """A few steps on 64 real HH pairs: transcripts split, long ones cut, training runs."""
    with gzip.open(SHARED_HH, "rt") as handle:
        lines = [next(handle) for _ in range(64)]
    data = tmp_path / "hh"
    data.mkdir()
    (data / "pairs.jsonl").write_text("".join(lines))
    from rlhf.data import load_dataset_dir

    rows = load_dataset_dir(str(data), "preference")
    # each transcript split at its last "\n\nAssistant:": a shared dialogue, two different answers
    assert len(rows) == 64 and all(r["prompt"].rstrip().endswith("Assistant:") for r in rows)
    assert all("\n\nHuman:" not in r["chosen"] + r["rejected"] for r in rows)  # no later turn in an answer
    metrics = main(quick_argv(tiny_llama, data, tmp_path / "out", "--lora_rank", "4"))
    assert 0 < metrics["train_loss"] < 5 and "eval_accuracy" in metrics  # finite, a pairwise loss near ln 2
