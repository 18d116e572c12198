"""The fused LM loss: equals cross-entropy on the logits (value and gradients, masked prompt tokens included),
on full, tied, LoRA + modules_to_save and Mixtral models, and in a Trainer with gradient accumulation."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from rlhf.errors import ConfigError
from rlhf.sft.batching import PaddedCollator
from rlhf.sft.stage import SFTTrainer
from rlhf.training.fused_loss import (
    CausalLMHeadLoss,
    build_lm_head_loss,
    linear_cross_entropy,
    output_projection,
    resolve_implementation,
)


def _labels(batch, length, vocab, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :prompt] = -100  # the prompt
    labels[0, -2:] = -100  # right padding of the first row
    return labels


def _reference(hidden, weight, bias, labels, num_items=None):
    """transformers' ForCausalLMLoss on the dense float32 logits."""
    logits = (hidden @ weight.t() + (0 if bias is None else bias)).float()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_equals_cross_entropy_with_gradients(chunk, with_bias, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    labels = _labels(3, 9, 40, prompt=4)
    inputs = [t for t in (hidden, weight, bias) if t is not None]

    expected = _reference(hidden, weight, bias, labels, num_items)
    expected_grads = torch.autograd.grad(expected, inputs)
    got = linear_cross_entropy(hidden, weight, bias, labels, num_items, chunk=chunk)
    got_grads = torch.autograd.grad(got, inputs)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # masked positions (prompt, padding, the last token) get exactly zero gradient
    assert hidden.shape[1] - 1 not in torch.nonzero(got_grads[0][0].abs().sum(-1)).flatten().tolist()
    assert torch.all(got_grads[0][:, :3] == 0)


def test_float32_hidden_states_with_bf16_weights():
    """Accelerate's mixed precision hands the loss float32 hidden states of a bf16 model, outside autocast
    (found on an H200: the SFT stage crashed with a dtype mismatch). The loss runs the head in bf16."""
    torch.manual_seed(0)
    weight = torch.randn(40, 16).bfloat16().requires_grad_()
    hidden = torch.randn(3, 9, 16).bfloat16().float().requires_grad_()
    labels = _labels(3, 9, 40, prompt=4)
    got = linear_cross_entropy(hidden, weight, None, labels, chunk=5)
    got.backward()
    reference = _reference(hidden.detach().bfloat16(), weight.detach(), None, labels)
    torch.testing.assert_close(got, reference, atol=1e-2, rtol=1e-2)
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden.grad).all() and weight.grad.abs().sum() > 0


def test_a_micro_batch_without_learned_tokens_adds_nothing():
    """Under gradient accumulation (``num_items_in_batch`` given) an all-prompt batch is a zero loss."""
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = linear_cross_entropy(
        hidden, weight, None, torch.full((1, 5), -100), num_items_in_batch=torch.tensor(7)
    )
    loss.backward()
    assert loss.item() == 0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def _batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _fused_equals_model_loss(model, num_items=None):
    """The fused loss on the model's hidden states vs the model's own loss: value and every gradient."""
    inputs, labels = _batch(model.config.vocab_size)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    model.zero_grad()
    expected = model(**inputs, labels=labels, **kwargs).loss
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    head_loss = CausalLMHeadLoss(model, "torch")
    model.zero_grad()
    outputs = model(**inputs, **head_loss.model_kwargs(labels.device))
    assert outputs.logits.shape[1] == 0  # no logits were computed
    got = head_loss(outputs, labels, num_items)
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name
        )


@pytest.mark.parametrize("num_items", [None, 11])
def test_full_model(tiny_llama, num_items):
    _fused_equals_model_loss(AutoModelForCausalLM.from_pretrained(tiny_llama), num_items)


def test_tied_embeddings(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _fused_equals_model_loss(model)


def test_lora_with_lm_head_in_modules_to_save(tiny_llama):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # the trained copy differs from the frozen original, so using the wrong one shows
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    weight, _ = output_projection(model)
    assert weight is model.base_model.model.lm_head.modules_to_save["default"].weight
    _fused_equals_model_loss(model)


def test_mixtral_router_loss_is_kept(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_factory("mixtral"), output_router_logits=True, router_aux_loss_coef=0.5
    )
    _fused_equals_model_loss(model)


def test_lora_on_lm_head_falls_back_to_the_model_loss(tiny_llama, caplog):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert output_projection(model) is None
    assert build_lm_head_loss(model, "auto") is None
    assert "model's own loss is used" in caplog.text


def test_implementation_choice():
    assert resolve_implementation("auto", "cpu") == "torch"
    assert resolve_implementation("off", "cpu") == "off"
    with pytest.raises(ConfigError, match="--fused_loss liger needs a GPU"):
        resolve_implementation("liger", "cpu")
    with pytest.raises(ConfigError, match="--fused_loss must be one of"):
        resolve_implementation("triton", "cpu")


@pytest.mark.parametrize("installed", [("liger_kernel", "triton"), ("liger_kernel",), ()])
def test_auto_picks_liger_on_cuda_only_when_it_can_run(monkeypatch, installed):
    import rlhf.training.fused_loss as fused_loss

    monkeypatch.setattr(
        fused_loss.importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    can_run = (
        len(installed) == 2
    )  # liger-kernel imports Triton: without it, `liger` would fail at the first step
    assert resolve_implementation("auto", "cuda") == ("liger" if can_run else "torch")
    assert resolve_implementation("auto", "cpu") == "torch"
    if not can_run:
        with pytest.raises(ConfigError, match="liger-kernel package with Triton"):
            resolve_implementation("liger", "cuda")


def _train(model_dir, tmp_path, fused: str, examples, bf16: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{fused}-{bf16}"), bf16=bf16, use_cpu=bf16 and not torch.cuda.is_available(),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
        report_to="none", save_strategy="no", remove_unused_columns=False, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, data_collator=PaddedCollator(pad_token_id=0),
        train_dataset=datasets.Dataset.from_list(examples), compute_loss_func=build_lm_head_loss(model, fused),
    )  # fmt: skip
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return (
        losses,
        {n: p.detach().clone() for n, p in model.named_parameters()},
        trainer.evaluate(trainer.train_dataset),
    )


def _examples():
    gen = torch.Generator().manual_seed(3)
    examples = []
    for n, prompt in [(7, 3), (12, 9), (5, 2), (9, 8), (10, 4), (6, 5), (8, 1), (11, 6)]:
        ids = torch.randint(4, 500, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def test_trainer_with_gradient_accumulation_matches_the_model_loss(tiny_llama, tmp_path):
    """Same logged losses, same weights after two SGD steps of 2 x 2 examples, same eval loss."""
    examples = _examples()
    plain_losses, plain_weights, plain_eval = _train(tiny_llama, tmp_path, "off", examples)
    fused_losses, fused_weights, fused_eval = _train(tiny_llama, tmp_path, "torch", examples)
    assert len(plain_losses) == 2
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert fused_eval["eval_loss"] == pytest.approx(plain_eval["eval_loss"], rel=1e-5)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_the_model_returns_only_the_last_hidden_state(tiny_llama):
    """Every other hidden state would be converted to float32 by Accelerate under --bf16 (memory for
    nothing): the loss asks for the last one, the final norm's output, and gets no other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    head_loss = CausalLMHeadLoss(model, "torch")
    ids = torch.randint(4, 100, (2, 9))
    out = model(input_ids=ids, **head_loss.model_kwargs(ids.device))
    assert [h is not None for h in out.hidden_states] == [False] * model.config.num_hidden_layers + [True]
    torch.testing.assert_close(out.hidden_states[-1], model.model(input_ids=ids).last_hidden_state)
    assert out.logits.shape[1] == 0


def test_trainer_in_bf16_mixed_precision(tiny_llama, tmp_path, fresh_accelerate_state):
    """A bf16 model under ``--bf16``: Accelerate returns float32 hidden states to the loss (the SFT stage
    crashed so on an H200); the fused loss trains and logs the model loss within bf16 noise."""
    examples = _examples()
    plain_losses, _, _ = _train(tiny_llama, tmp_path, "off", examples, bf16=True)
    fused_losses, fused_weights, _ = _train(tiny_llama, tmp_path, "torch", examples, bf16=True)
    assert fused_losses == pytest.approx(plain_losses, rel=2e-2)
    assert all(torch.isfinite(w.float()).all() for w in fused_weights.values())
