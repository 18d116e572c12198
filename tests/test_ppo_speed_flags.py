"""run_ppo_with_peft.py's generation and speed flags end to end: --generation_engine (and its fallback for
an architecture the engine does not implement), --generation_lora merged, --generation_compile and
--torch_compile train as the plain run does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ppo_run import REPO, one_thread, read_metrics  # noqa: F401 - one_thread: autouse fixture

import run_ppo_with_peft
from rlhf.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny_gemma(tiny_llama, tmp_path_factory) -> Path:
    """A tiny gemma (an architecture the static engine does not implement) with the tiny llama's tokenizer."""
    from transformers import GemmaConfig, GemmaForCausalLM

    out = tmp_path_factory.mktemp("gemma")
    tokenizer = load_tokenizer(str(tiny_llama))
    config = GemmaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_size=16,
        intermediate_size=32, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_generation_engine_flag(tiny_llama, tiny_gemma, tmp_path, capsys):
    """--generation_engine: hf and static both train the tiny llama, each saying which one runs (static also
    logs its KV cache size); on gemma, which the engine does not implement, auto falls back to HF generate
    with the reason, and static is a one-line error naming the flag."""

    def argv(model: Path, engine: str) -> list[str]:
        return [
            "--sft_model_path", str(model), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / f"{model.name}-{engine}"),
            "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_response_length", "4",
            "--max_steps", "1", "--disable_tqdm", "true", "--generation_engine", engine,
        ]  # fmt: skip

    assert run_ppo_with_peft.main(argv(tiny_llama, "hf"))["step"] == 1
    err = capsys.readouterr().err
    assert "generation engine: hf (--generation_engine hf)" in err and "static KV cache" not in err
    assert run_ppo_with_peft.main(argv(tiny_llama, "static"))["step"] == 1
    err = capsys.readouterr().err
    assert "generation engine: static (--generation_engine static)" in err
    assert "static KV cache: 2 layers x K,V [2 rows, 2 kv heads, 80 slots, 16 dims] float32" in err
    assert err.count("static KV cache") == 1  # allocated once, at start: before the loop's first line
    assert err.index("static KV cache") < err.index("each rollout:")
    assert run_ppo_with_peft.main(argv(tiny_gemma, "auto"))["step"] == 1
    err = capsys.readouterr().err
    assert "generation engine: hf (--generation_engine auto: the static engine runs llama, mistral, " in err
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv(tiny_gemma, "static"))
    err = capsys.readouterr().err
    message = (
        "error: --generation_engine static: the static engine runs llama, mistral, mixtral, qwen2 models, "
    )
    assert exc.value.code == 2 and message + "not gemma (use --generation_engine hf or auto)" in err, err
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_generation_lora_merged_trains_like_unmerged(tiny_llama, tmp_path, capsys):
    """--generation_lora merged samples the same tokens (fp32) as the unmerged adapter, so two PPO steps log
    the same rewards and losses; with HF generate it is a one-line error naming the flag."""

    def argv(lora: str, engine: str = "static") -> list[str]:
        return [
            "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / f"{lora}-{engine}"),
            "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_response_length", "6",
            "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3",
            "--generation_engine", engine, "--generation_lora", lora,
        ]  # fmt: skip

    run_ppo_with_peft.main(argv("unmerged"))
    run_ppo_with_peft.main(argv("merged"))
    assert "LoRA folded into a" in capsys.readouterr().err
    unmerged = read_metrics(tmp_path / "unmerged-static" / "metrics.jsonl")
    merged = read_metrics(tmp_path / "merged-static" / "metrics.jsonl")
    assert len(merged) == len(unmerged) == 2
    for a, b in zip(merged, unmerged):
        assert a["reward/score"] == b["reward/score"]
        assert a["response/length_mean"] == b["response/length_mean"]
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-4, abs=1e-6)
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv("merged", engine="hf"))
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and "error: --generation_lora merged: the static engine on a Hugging Face" in err
    )
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_generation_compile_flag(tiny_llama, tmp_path, capsys):
    """--generation_compile: the engine's decode step through torch.compile (inductor) trains one step and
    says so; with HF generate it is a one-line error naming the flag."""

    def argv(engine: str) -> list[str]:
        return [
            "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / engine),
            "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_response_length", "4",
            "--max_steps", "1", "--disable_tqdm", "true", "--generation_engine", engine, "--generation_compile",
        ]  # fmt: skip

    assert run_ppo_with_peft.main(argv("static"))["step"] == 1
    assert "decode step compiled (inductor)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv("hf"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: --generation_compile: the static engine on a Hugging Face" in err
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_torch_compile_trains_like_eager(tiny_llama, tmp_path, capsys):
    """--torch_compile (here with the aot_eager backend, which runs the captured graphs as traced) and
    --gradient_checkpointing: two optimizer steps log the eager run's losses, so the compiled layers'
    rollout forwards, updates, adapter switches and recomputes compute what eager ones do."""

    def argv(name: str, *extra: str) -> list[str]:
        return [
            "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--pretrain_dataset_dir", str(REPO / "pt_data"),
            "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "4",
            "--per_device_mini_train_batch_size", "2", "--max_prompt_length", "64", "--max_response_length", "6",
            "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3",
            "--gradient_checkpointing", *extra,
        ]  # fmt: skip

    run_ppo_with_peft.main(argv("eager"))
    run_ppo_with_peft.main(argv("compiled", "--torch_compile_backend", "aot_eager"))
    assert "--torch_compile: 2 decoder layers run one compiled forward (aot_eager)" in capsys.readouterr().err
    eager = read_metrics(tmp_path / "eager" / "metrics.jsonl")
    compiled = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    assert len(compiled) == len(eager) == 2
    for a, b in zip(compiled, eager):
        for key in ("reward/score", "objective/kl", "loss/policy", "loss/value", "loss/pretrain"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
