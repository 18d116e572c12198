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


def save_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on q_proj / v_proj of ``base`` with non-zero B, saved with its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    assert not (out / "config.json").exists()
    return out


@pytest.fixture
def adapter_dir(tiny_llama, tmp_path) -> Path:
    """A LoRA adapter of the tiny llama."""
    return save_adapter(tiny_llama, tmp_path / "adapter")


def merged_adapter_state(adapter: Path) -> dict[str, torch.Tensor]:
    """The shard state (TP=1) of the base with the adapter merged in: what training starts from."""
    from rlhf.tp.loading import load_rank_state

    return load_rank_state(str(adapter), 0, 1)[1]


def test_mixtral_with_an_adapter_loads_as_the_merged_model(tiny_model_factory, tmp_path, world_of_one):
    """transformers 5 holds a Mixtral's experts fused in memory (``mlp.experts.gate_up_proj``, ...), not
    under the per-expert keys of its files: the merged model in memory is mapped back to them, so every
    shard (TP=2 included) equals the one of the merged model saved to disk, and the logits are HF's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.errors import CheckpointError
    from rlhf.models.loading import load_causal_lm
    from rlhf.tp.key_maps import file_layout_state
    from rlhf.tp.loading import load_rank_state, load_tp_model

    base = tiny_model_factory("mixtral")
    adapter = save_adapter(base, tmp_path / "adapter")
    merged = load_causal_lm(str(adapter), torch_dtype="float32", merge_adapter=True)
    merged.save_pretrained(tmp_path / "merged")
    assert any("gate_up_proj" in k for k in merged.state_dict())  # the fused layout this test is about
    for rank in (0, 1):
        on_disk = load_rank_state(str(tmp_path / "merged"), rank, 2)[1]
        for ckpt_dir, peft_path in ((adapter, None), (base, adapter)):
            state = load_rank_state(str(ckpt_dir), rank, 2, peft_path=peft_path and str(peft_path))[1]
            assert state.keys() == on_disk.keys()
            assert all(torch.equal(state[k], on_disk[k]) for k in state), (ckpt_dir, rank)
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    enc = tokenizer(["I love cats and dogs.", "The weather is nice"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ours = load_tp_model(str(adapter), rank=0, world_size=1, device=torch.device("cpu"), model_type="mixtral")
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    real = mask.bool()
    with torch.no_grad():
        expected = merged(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, mask)[real], expected[real], atol=2e-5, rtol=1e-4)
        plain = base_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(plain[real], expected[real], atol=1e-3)  # the adapter changes the model
    # a layout other than [experts, 2 * ffn, dim] (say, a transposed one) is refused, not misread
    args = load_rank_state(str(base), 0, 1)[0]
    key = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(CheckpointError, match="fuses a Mixtral's experts in a layout"):
        file_layout_state({key: merged.state_dict()[key].transpose(1, 2)}, args)


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
