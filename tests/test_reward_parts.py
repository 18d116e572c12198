"""Reward-model pieces: the pairwise loss, last-token reading, padding sides, pair preparation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.reward import (
    PairCollator,
    clean_pairs,
    last_token_index,
    pairwise_accuracy,
    pairwise_loss,
    sequence_rewards,
    tokenize_pair_row,
)


def test_pairwise_loss_matches_a_loop_reference():
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(7), torch.randn(7), torch.rand(7)
    expected = (
        sum(-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(chosen, rejected, margin)) / 7
    )
    expected += 0.01 * sum((c + r) ** 2 for c, r in zip(chosen, rejected)) / 7
    got = pairwise_loss(chosen, rejected, margin, center_coefficient=0.01)
    assert got.item() == pytest.approx(float(expected), rel=1e-5)
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(
        2 / 3
    )
    # a tie is not a win: a reward model scoring everything alike has accuracy 0, not 1
    assert pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)


def test_last_token_index_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 4]


@pytest.fixture(scope="module")
def reward_model(tiny_llama):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model


@pytest.fixture(scope="module")
def eos_pad_tokenizer(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token  # the common real-checkpoint case
    return tokenizer


def test_rewards_are_read_at_the_last_real_token_for_both_padding_sides(reward_model, eos_pad_tokenizer):
    tok = eos_pad_tokenizer
    rows = [
        {"prompt": "Tell me about cats.\n", "prompt_messages": [], "chosen": "I love cats.", "rejected": "No.",
         "margin": 0.0},
        {"prompt": "Rain?\n", "prompt_messages": [], "chosen": "Rain is wonderful and I enjoy it a lot.",
         "rejected": "I hate rain.", "margin": 1.0},
    ]  # fmt: skip
    pairs = [tokenize_pair_row(r, tok, max_length=64, max_response=64) for r in rows]
    with torch.no_grad():
        alone = [
            reward_model(torch.tensor([ids])).logits[0, 0].item()
            for ids in [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        ]
        for side in ("right", "left"):
            batch = PairCollator(tok.pad_token_id, side)(pairs)
            assert batch["input_ids"].shape[0] == 4 and batch["margin"].tolist() == [0.0, 1.0]
            got = sequence_rewards(reward_model, batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(got, torch.tensor(alone), atol=1e-4, rtol=1e-4)


def test_pair_truncation_cuts_prompt_left_and_response_right(eos_pad_tokenizer):
    tok = eos_pad_tokenizer
    row = {"prompt": "word " * 50, "prompt_messages": [], "chosen": "I love cats a lot " * 10, "rejected": "No.",
           "margin": 0.0}  # fmt: skip
    pair = tokenize_pair_row(row, tok, max_length=32, max_response=20)
    assert pair["truncated"] and len(pair["chosen_ids"]) == 32
    assert pair["rejected_ids"][0] == tok.bos_token_id and pair["rejected_ids"][-1] == tok.eos_token_id
    chosen_response = tok(row["chosen"], add_special_tokens=False)["input_ids"]
    assert pair["chosen_ids"][-20:] == chosen_response[:20]  # response cut on the right, EOS lost
    # one prompt for both sides: the room the longer response leaves, not more for the short rejected one
    rejected_response = tok(row["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair["rejected_ids"] == pair["chosen_ids"][:12] + rejected_response


def test_pairs_without_a_preference_are_dropped(caplog):
    rows = datasets.Dataset.from_list(
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same "},
            {"prompt": "p", "chosen": " ", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": ""},
        ]
    )
    with caplog.at_level("WARNING"):
        kept = clean_pairs(rows)
    assert kept["chosen"] == ["a"]
    assert "dropped 3 of 4 pairs: 1 with chosen == rejected, 2 with an empty response" in caplog.text


def test_fp16_keeps_the_trainable_score_head_and_adapter_in_float32(tiny_llama):
    """``--fp16``'s GradScaler refuses float16 gradients; PEFT copies the score head in the base's dtype."""
    from peft import TaskType

    from rlhf.models.lora import LoraSpec
    from rlhf.training import make_trainable

    def trainable_dtypes(fp16: bool) -> tuple[dict[str, torch.dtype], set[torch.dtype]]:
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_llama, num_labels=1, dtype=torch.float16
        )
        model = make_trainable(base, LoraSpec(rank=4, targets=["q_proj"]), task_type=TaskType.SEQ_CLS,
                               head_modules=("score",), fp16=fp16)  # fmt: skip
        params = list(model.named_parameters())
        return {n: p.dtype for n, p in params if p.requires_grad}, {
            p.dtype for _, p in params if not p.requires_grad
        }

    trained, frozen = trainable_dtypes(fp16=True)
    assert any("score" in n for n in trained) and set(trained.values()) == {torch.float32}
    assert frozen == {torch.float16}  # the frozen base stays as loaded
    trained, _ = trainable_dtypes(fp16=False)
    assert {d for n, d in trained.items() if "score" in n} == {torch.float16}


def test_a_reward_model_trained_without_a_pad_token_scores_the_same_in_plain_transformers(
    tiny_llama, repo_root, tmp_path
):
    """A llama-style tokenizer without a pad token: the stage pads with <unk> instead of the EOS, so the
    saved model's own pooling (HF: the last token that is not the pad id) reads the EOS, where the stage
    trained it, in a right-padded batch of pairs too."""
    import json
    import shutil

    from test_reward_stage import quick_argv

    from run_rm_with_peft import main

    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_llama, nopad)
    for name in ("config.json", "tokenizer_config.json"):
        config = json.loads((nopad / name).read_text())
        config.pop("pad_token_id", None), config.pop("pad_token", None)
        (nopad / name).write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(nopad).pad_token is None
    out = tmp_path / "rm"
    main(quick_argv(nopad, repo_root / "rm_data", out, "--lora_rank", "-1"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert tokenizer.pad_token == "<unk>" and model.config.pad_token_id == tokenizer.unk_token_id
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in ("I love it", "No")]
    batch = PairCollator(tokenizer.pad_token_id, "right")(
        [{"chosen_ids": rows[0], "rejected_ids": rows[1], "margin": 0.0}]
    )
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        ours = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(plain, ours)


def write_sft_adapter(base: Path, sft: Path) -> Path:
    """A random (non-zero) LoRA adapter on ``base`` saved as run_sft_with_peft.py saves one, with the
    tokenizer: an SFT adapter dir for the next stage's model flag."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(sft)
    AutoTokenizer.from_pretrained(base).save_pretrained(sft)
    return sft


def test_a_lora_reward_model_on_an_sft_adapter_dir_reloads_as_trained(tiny_llama, repo_root, tmp_path):
    """--model_name_or_path an SFT adapter dir: the reward adapter names <output_dir>/base_model (the SFT
    adapter merged into its base) and reloads with plain peft scoring the held-out pairs as training did."""
    from peft import AutoPeftModelForSequenceClassification
    from test_reward_stage import eval_rewards, quick_argv

    from run_rm_with_peft import main

    sft = write_sft_adapter(tiny_llama, tmp_path / "sft_adapter")
    out = tmp_path / "rm"
    metrics = main(quick_argv(sft, repo_root / "rm_data", out, "--lora_rank", "8"))
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(out / "base_model") and (out / "base_model" / "model.safetensors").is_file()
    model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    rewards = eval_rewards(model, out, repo_root / "rm_data", tmp_path)
    assert rewards[:, 0].mean().item() == pytest.approx(metrics["eval_reward_chosen"], abs=1e-4)
