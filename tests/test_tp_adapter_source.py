"""A PEFT adapter dir (what ``run_sft_with_peft.py`` saves with LoRA: no config.json) as the source of the
TP trainers: ``solver_train``, ``verifier_train`` and ``ppo_train`` train on the base with the adapter
merged, and their saved shard dirs are that merged model (config and tokenizer from the base / adapter,
no adapter files), which loads, evaluates and merges back to Hugging Face."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tp_ppo import ROWS


@pytest.fixture
def adapter_dir(tiny_llama, tmp_path) -> Path:
    """A LoRA adapter on q_proj / v_proj of the tiny llama with non-zero B, saved with its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter/config.json").exists()
    return tmp_path / "adapter"


def merged_adapter_state(adapter: Path) -> dict[str, torch.Tensor]:
    """The shard state (TP=1) of the base with the adapter merged in: what training starts from."""
    from rlhf.tp.loading import load_rank_state

    return load_rank_state(str(adapter), 0, 1)[1]


def check_saved_dir(out: Path, tiny_llama: Path, head: str) -> None:
    """A plain shard dir: the base's config.json, a tokenizer, none of the adapter's own files."""
    assert json.loads((out / "params.json").read_text())["head"] == head
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny_llama / "config.json").read_text()
    )
    assert (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists() and not (out / "README.md").exists()
    assert not list(out.parent.glob(f".{out.name}*.tmp"))  # no staging dir left behind


def test_solver_and_verifier_train_from_an_adapter_dir_save_the_merged_model(
    tiny_llama, adapter_dir, tmp_path, world_of_one
):
    import checkpoint_split
    from rlhf.tp import solver_evaluate, solver_train, verifier_train
    from rlhf.tp.loading import load_tp_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--ckpt_dir", str(adapter_dir), "--train_file", str(data), "--max_batch_size", "4"]
    common += ["--max_steps", "1", "--eval_ratio", "0", "--max_seq_len", "64"]
    # LoRA on w1 only: wq stays frozen, so the saved wq must be the base's plus the PEFT adapter's update
    solver_train.main(
        common + ["--save_dir", str(tmp_path / "solver"), "--lora_rank", "4", "--lora_target", "w1"]
    )
    check_saved_dir(tmp_path / "solver", tiny_llama, "lm")
    start = merged_adapter_state(adapter_dir)
    base = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=torch.device("cpu")).state_dict()
    saved = torch.load(tmp_path / "solver/consolidated.00.pth", weights_only=True)
    key = "layers.0.attention.wq.weight"
    assert torch.equal(saved[key], start[key]) and not torch.equal(saved[key], base[key])
    assert not torch.equal(saved["layers.0.feed_forward.w1.weight"], start["layers.0.feed_forward.w1.weight"])

    solver_evaluate.main(
        ["--ckpt_dir", str(tmp_path / "solver"), "--label_file", str(data), "--log_dir", str(tmp_path / "eval"),
         "--max_gen_len", "4"]
    )  # fmt: skip
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["n"] == len(ROWS)

    verifier_train.main(common + ["--save_dir", str(tmp_path / "verifier"), "--lr", "1e-2"])
    check_saved_dir(tmp_path / "verifier", tiny_llama, "scalar")
    checkpoint_split.main(
        ["--merge", "--ckpt_dir", str(tmp_path / "verifier"), "--save_path", str(tmp_path / "verifier_hf")]
    )
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "verifier_hf", dtype=torch.float32)
    assert hf.score.weight.abs().sum() > 0  # the trained head


def test_ppo_train_from_an_adapter_dir_saves_the_actor(tiny_llama, adapter_dir, tmp_path, world_of_one):
    from rlhf.tp import ppo_train
    from rlhf.tp.loading import load_tp_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ppo_train.main(
        ["--actor_ckpt_dir", str(adapter_dir), "--actor_save_dir", str(tmp_path / "actor"), "--reward_fn", "gsm8k",
         "--train_file", str(data), "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
         "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "4", "--max_steps", "1",
         "--lora_rank", "4", "--report_to", "none"]
    )  # fmt: skip
    check_saved_dir(tmp_path / "actor", tiny_llama, "lm")
    actor = load_tp_model(str(tmp_path / "actor"), rank=0, world_size=1, device=torch.device("cpu"))
    base = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=torch.device("cpu")).state_dict()
    key = "layers.0.attention.wq.weight"
    # one step at --actor_lr moves the weights by little; the PEFT adapter's update is in them
    torch.testing.assert_close(
        actor.state_dict()[key], merged_adapter_state(adapter_dir)[key], atol=1e-3, rtol=0
    )
    assert not torch.allclose(actor.state_dict()[key], base[key], atol=1e-3, rtol=0)
