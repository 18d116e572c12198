"""The rollout's forwards and the update's mini-batches run over the columns their own rows need
(``SequenceBatch.fitted``): only padding goes, so every output over the kept columns equals the full batch's,
and a PPO run gives the same metrics as one that never fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlhf.ppo.batch as batch_module
from rlhf.models.lora import LoraSpec
from rlhf.ppo.batch import RolloutBuffer, SequenceBatch, fitted_width, left_pad

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_fitted_width_rounds_up_within_the_limit():
    assert [fitted_width(n, 100) for n in (0, 1, 16, 17, 99)] == [1, 16, 16, 32, 100]
    assert fitted_width(5, 10) == 10 and fitted_width(5, 10, multiple=1) == 5


def mixed_batch(pad: int = 0) -> SequenceBatch:
    """Prompts of 3, 6 and 2 tokens (left-padded to 8), responses of 2, 5 and 0 tokens (right-padded to 9)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 6, 2)]
    ids, mask = left_pad(prompts, pad)
    ids, mask = (
        torch.cat([torch.full((3, 2), pad), ids], 1),
        torch.cat([torch.zeros(3, 2, dtype=torch.long), mask], 1),
    )
    response = torch.randint(3, 500, (3, 9), generator=gen)
    response_mask = (torch.arange(9)[None] < torch.tensor([[2], [5], [0]])).long()
    return SequenceBatch(
        torch.cat([ids, response.masked_fill(response_mask == 0, pad)], 1),
        torch.cat([mask, response_mask], 1),
        8,
    )


def test_fitted_batches_drop_only_padding(monkeypatch):
    monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", 1)
    full = mixed_batch()
    assert full.lengths() == ([3, 6, 2], [2, 5, 0])
    rows = torch.tensor([0, 2])
    fitted = full.select(rows).fitted(3, 2)  # rows 0 and 2: the longest prompt 3, the longest response 2
    assert fitted.prompt_len == 3 and fitted.input_ids.shape == (2, 5)
    chosen = full.select(rows)
    kept = chosen.attention_mask.bool()
    assert int(kept.sum()) == int(fitted.attention_mask.sum())  # every real token stays
    assert torch.equal(chosen.input_ids[kept], fitted.input_ids[fitted.attention_mask.bool()])
    assert torch.equal(chosen.position_ids[kept], fitted.position_ids[fitted.attention_mask.bool()])
    assert torch.equal(fitted.response_ids, chosen.response_ids[:, :2])
    assert full.select(rows).fitted(1, 0).response_ids.shape[1] == 1  # one response column at least


def test_outputs_over_a_fitted_batch_equal_the_full_batchs(tiny_llama, monkeypatch):
    from rlhf.ppo.peft_models import build_peft_policy_models

    monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", 1)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    models = build_peft_policy_models(
        str(tiny_llama), actor=spec, critic=spec, reward_adapter=None, critic_init="sft"
    )
    with torch.no_grad():
        for name, param in models.named_parameters():
            if "lora_B" in name:  # adapters that change the outputs
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    models.train(False)
    full = mixed_batch()
    rows = torch.tensor([1, 0])
    fitted = full.select(rows).fitted(6, 5)
    assert fitted.input_ids.shape == (2, 11)  # from 17 columns
    mask = full.select(rows).response_mask[:, :5]
    with torch.no_grad():
        for name, run in (
            ("policy", lambda b: models.policy_logprobs(b, 0.7, with_entropy=True)[0]),
            ("entropy", lambda b: models.policy_logprobs(b, 0.7, with_entropy=True)[1]),
            ("reference", lambda b: models.reference_logprobs(b, 0.7)),
            ("values", models.values),
        ):
            expected = run(full.select(rows))[:, :5] * mask
            torch.testing.assert_close(run(fitted) * mask, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_a_buffers_mini_batches_are_fitted_with_their_per_token_tensors(monkeypatch):
    monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", 1)
    full = mixed_batch()
    per_token = torch.arange(27, dtype=torch.float32).reshape(3, 9)
    order = torch.tensor([[2, 0, 1]])
    buffer = RolloutBuffer(
        full, per_token, per_token + 100, order, 2, torch.arange(3), scores=torch.tensor([1.0, 2.0, 3.0])
    )
    batch, old = buffer.mini_batch(0)  # rows 2 and 0
    assert batch.prompt_len == 3 and batch.input_ids.shape[1] == 3 + 2
    assert torch.equal(old["old_logprobs"], per_token[[2, 0], :2]) and torch.equal(
        old["scores"], torch.tensor([3.0, 1.0])
    )
    assert torch.equal(old["advantages"], per_token[[2, 0], :2] + 100)
    batch, old = buffer.mini_batch(1)  # row 1 alone, the longest of both
    assert batch.prompt_len == 6 and old["old_logprobs"].shape == (1, 5)


def eos_prone(base: Path, out: Path, scale: float) -> Path:
    """``base`` with its EOS row of the output layer scaled: responses end early, at different lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.get_output_embeddings().weight[model.config.eos_token_id] *= scale
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_ppo_run_with_fitted_batches_logs_what_one_without_does(
    tiny_llama, tmp_path, monkeypatch, estimator
):
    """Prompts of different lengths (the toy questions) and responses that end early (an EOS-prone model),
    mini-batches of 2: each mini-batch and forward chunk drops the prompt and response columns its rows do
    not need; every logged metric (timings aside) is as without."""
    import run_ppo_with_peft

    model = eos_prone(tiny_llama, tmp_path / "model", 40.0)

    def run(multiple: int, out: Path) -> list[dict]:
        monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", multiple)
        group = (
            ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "2"] if estimator == "grpo" else []
        )
        run_ppo_with_peft.main([
            "--sft_model_path", str(model), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "2",
            "--per_device_forward_batch_size", "2", "--max_response_length", "8", "--min_response_length", "1",
            "--logging_steps", "1", "--seed", "3", "--disable_tqdm", "true", *group,
        ])  # fmt: skip
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    widths, fit = [], SequenceBatch.fitted

    def recorded(self, longest_prompt, longest_response):
        out = fit(self, longest_prompt, longest_response)
        widths.append((self.prompt_len, out.prompt_len, self.input_ids.shape[1] - self.prompt_len,
                       out.input_ids.shape[1] - out.prompt_len))  # fmt: skip
        return out

    monkeypatch.setattr(SequenceBatch, "fitted", recorded)
    fitted = run(1, tmp_path / "fitted")
    assert any(after < before for before, after, _, _ in widths)  # prompt columns were dropped
    assert any(after < before for _, _, before, after in widths)  # and response columns
    full = run(10_000, tmp_path / "full")
    assert len(fitted) == len(full) == 2
    assert 1 < fitted[0]["response/length_mean"] < 8
    for got, expected in zip(fitted, full):
        for key, value in expected.items():
            if not key.startswith("time/") and key != "samples_per_s":
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
