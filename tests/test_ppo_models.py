"""The PEFT models bundle against plain transformers/peft, and the generation seam."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.generation import SamplingConfig, build_generator, response_mask_after_eos
from rlhf.models import load_tokenizer
from rlhf.models.lora import LoraSpec
from rlhf.ppo.batch import SequenceBatch, left_pad
from rlhf.ppo.peft_models import build_peft_policy_models, read_reward_adapter
from rlhf.ppo.stats import logprobs_from_logits

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def build_rm_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """An RM adapter as run_rm_with_peft.py writes it: SEQ_CLS LoRA with the score head in modules_to_save
    (random non-zero LoRA weights so the adapter matters)."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=32, target_modules=TARGETS, modules_to_save=["score"],
        init_lora_weights=False,
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm_adapter(tiny_llama, tmp_path_factory) -> Path:
    return build_rm_adapter(tiny_llama, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def models(tiny_llama, rm_adapter):
    m = build_peft_policy_models(
        str(tiny_llama),
        actor=LoraSpec(8, 32, 0.0, TARGETS),
        critic=LoraSpec(8, 32, 0.0, TARGETS),
        reward_adapter=read_reward_adapter(str(rm_adapter)),
        critic_init="reward",
    )
    return m.eval()


@pytest.fixture(scope="module")
def batch(tiny_llama) -> SequenceBatch:
    """Two prompts of different lengths (left-padded) with responses of different lengths (right-padded)."""
    tok = load_tokenizer(str(tiny_llama))
    prompts = [tok("Tell me how you feel about cats.")["input_ids"], tok("Hi")["input_ids"]]
    responses = [tok("I love cats.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], [5, 6]]
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    width = max(len(r) for r in responses)
    resp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    resp_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    return SequenceBatch(
        torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask], 1), prompt_ids.shape[1]
    )


def unpadded_rows(batch: SequenceBatch) -> list[tuple[torch.Tensor, int]]:
    """Each sequence without padding, with its prompt length."""
    rows = []
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        real = ids[mask.bool()]
        prompt_real = int(mask[: batch.prompt_len].sum())
        rows.append((real, prompt_real))
    return rows


def test_reference_logprobs_equal_plain_base_model(models, batch, tiny_llama):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ref = models.reference_logprobs(batch, temperature=0.7)
    for i, (ids, prompt_len) in enumerate(unpadded_rows(batch)):
        with torch.no_grad():
            logits = plain(ids[None]).logits[0, prompt_len - 1 : -1]
        expected = logprobs_from_logits(logits[None], ids[None, prompt_len:], 0.7)[0]
        n = expected.shape[0]
        torch.testing.assert_close(ref[i, :n], expected, atol=1e-5, rtol=1e-5)


def test_fresh_actor_equals_reference(models, batch):
    actor, _ = models.policy_logprobs(batch, 1.0)
    torch.testing.assert_close(actor, models.reference_logprobs(batch, 1.0))


def test_reward_adapter_equals_plain_peft_rm(models, batch, tiny_llama, rm_adapter):
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    plain = PeftModel.from_pretrained(plain, rm_adapter).eval()
    scores = models.reward_scores(batch)
    assert scores.abs().max() > 1e-3  # the adapter is not a no-op
    for i, (ids, _) in enumerate(unpadded_rows(batch)):
        with torch.no_grad():
            expected = plain(ids[None]).logits[0, 0]
        torch.testing.assert_close(scores[i], expected, atol=1e-5, rtol=1e-5)


def test_critic_from_reward_says_which_critic_flags_it_overrides(tiny_llama, rm_adapter, caplog):
    """The critic copies the reward adapter whole: --critic_lora_target q_proj (the reward adapter targets
    every linear layer) and a matching rank and alpha give one warning naming only the target flag."""
    import logging

    with caplog.at_level(logging.WARNING, logger="rlhf.ppo.peft_models"):
        m = build_peft_policy_models(
            str(tiny_llama), actor=LoraSpec(8, 32, 0.0, ["q_proj"]), critic=LoraSpec(8, 32, 0.0, ["q_proj"]),
            reward_adapter=read_reward_adapter(str(rm_adapter)), critic_init="reward",
        )  # fmt: skip
    assert sorted(m.lm.peft_config["critic"].target_modules) == sorted(TARGETS)
    assert "--critic_lora_target replaced by the reward adapter's (r=8, alpha=32" in caplog.text


def test_critic_from_reward_predicts_rm_score(models, batch):
    values = models.critic_token_values(batch)
    rows = torch.arange(values.shape[0])
    torch.testing.assert_close(values[rows, batch.last_token_positions], models.reward_scores(batch))
    assert models.values(batch).shape == batch.response_ids.shape


def test_value_and_reward_heads_run_in_float32_under_autocast(models, batch):
    """Under --bf16 autocast the body computes in bf16 but the scalar heads do not round their outputs
    to bf16's ~3 digits (GAE's value differences and tied group rewards would be that noise)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values, scores = models.critic_token_values(batch), models.reward_scores(batch)
        with models._adapter("critic"):
            critic_hidden = models._batch_hidden(models.lm, batch)
        with models._adapter("reward"):
            reward_hidden = models._batch_hidden(models.lm, batch)
    expected = (critic_hidden.float() @ models.value_head.weight.float().t()).squeeze(-1)
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-6)
    rows = torch.arange(batch.input_ids.shape[0])
    last = reward_hidden[rows, batch.last_token_positions].float()
    expected = (last @ models.reward_head.weight.float().t()).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)


def test_only_actor_and_critic_train(models):
    groups = models.parameter_groups()
    assert groups["actor"] and groups["critic"]
    trainable = {id(p) for g in groups.values() for p in g}
    for name, p in models.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name
        if id(p) in trainable:
            assert ".actor." in name or ".critic." in name or name.startswith("value_head"), name
    with models._adapter(None):  # PEFT flips requires_grad; the bundle restores it
        pass
    assert all(p.requires_grad for g in groups.values() for p in g)


def test_saved_actor_loads_with_plain_peft(models, batch, tiny_llama, tmp_path):
    with torch.no_grad():
        for p in models.parameter_groups()["actor"]:
            p.add_(0.01 * torch.randn_like(p))
    models.save_actor(tmp_path / "actor")
    models.save_critic(tmp_path / "critic")
    assert (tmp_path / "critic" / "value_head.safetensors").is_file()
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "actor"
    ).eval()
    ours, _ = models.policy_logprobs(batch, 1.0)
    for i, (ids, prompt_len) in enumerate(unpadded_rows(batch)):
        with torch.no_grad():
            logits = plain(input_ids=ids[None]).logits[0, prompt_len - 1 : -1]
        expected = logprobs_from_logits(logits[None], ids[None, prompt_len:])[0]
        torch.testing.assert_close(ours[i, : expected.shape[0]].detach(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, models.reference_logprobs(batch, 1.0))


def test_saved_critic_gives_the_same_values_with_plain_peft(models, batch, tiny_llama, tmp_path):
    """The critic dir (a causal-LM adapter and value_head.safetensors) read with plain peft: the value of
    each token is the value head on the adapter model's last hidden state, as the bundle computes it."""
    from safetensors.torch import load_file

    with torch.no_grad():
        for p in models.parameter_groups()["critic"]:
            p.add_(0.01 * torch.randn_like(p))
    models.save_critic(tmp_path / "critic")
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "critic"
    ).eval()
    head = load_file(tmp_path / "critic" / "value_head.safetensors")["weight"]  # [1, hidden]
    with torch.no_grad():
        ours = models.critic_token_values(batch)  # [B, T]
        for i, (ids, _) in enumerate(unpadded_rows(batch)):
            hidden = plain(input_ids=ids[None], output_hidden_states=True).hidden_states[-1][0]
            expected = (hidden.float() @ head.float().t()).squeeze(-1)
            real = batch.attention_mask[i].bool()
            torch.testing.assert_close(ours[i][real], expected, atol=1e-5, rtol=1e-5)


def test_full_parameter_actor_and_sft_critic(tiny_llama, batch):
    m = build_peft_policy_models(
        str(tiny_llama), actor=LoraSpec(-1, 0, 0, []), critic=LoraSpec(4, 8, 0.0, ["q_proj"]),
        reward_adapter=None, critic_init="sft",
    ).eval()  # fmt: skip
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert sum(p.numel() for p in m.parameter_groups()["actor"]) == n_base
    assert m.reward_scores(batch) is None
    torch.testing.assert_close(m.policy_logprobs(batch, 1.0)[0], m.reference_logprobs(batch, 1.0))


def test_response_mask_after_eos_ignores_pad_equal_to_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 9, 9]])
    assert response_mask_after_eos(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def generator_for(engine: str, models, sampling: SamplingConfig):
    """The PPO loop's generator for ``--generation_engine engine`` on the bundle's actor."""
    return build_generator(engine, models.generation_model, sampling, max_prompt_length=16, max_batch_size=2)


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_generator_honours_lengths_and_masks(models, tiny_llama, engine):
    tok = load_tokenizer(str(tiny_llama))
    prompt_ids, prompt_mask = left_pad([tok("Hi")["input_ids"], tok("Tell me about cats.")["input_ids"]], 0)
    sampling = SamplingConfig(
        max_new_tokens=7, min_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=0
    )
    torch.manual_seed(0)
    out = generator_for(engine, models, sampling).generate(prompt_ids, prompt_mask)
    assert out.response_ids.shape[0] == 2 and 3 <= out.response_ids.shape[1] <= 7
    assert (out.response_mask.sum(1) >= 3).all()
    assert (out.response_ids[out.response_mask == 0] == 0).all()


def test_concat_repads_both_sides_and_keeps_positions():
    a = SequenceBatch(torch.tensor([[7, 8, 5, 2]]), torch.tensor([[1, 1, 1, 1]]), prompt_len=2)
    b = SequenceBatch(torch.tensor([[9, 5, 6, 7]]), torch.tensor([[1, 1, 1, 1]]), prompt_len=1)
    c = SequenceBatch.concat([a, b], pad_id=3)
    assert c.prompt_len == 2
    assert c.input_ids.tolist() == [[7, 8, 5, 2, 3], [3, 9, 5, 6, 7]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert c.position_ids[1, 1:].tolist() == [0, 1, 2, 3]
    assert c.last_token_positions.tolist() == [3, 4]


def test_epoch_sampler_shards_and_resumes():
    from rlhf.ppo.data import EpochSampler

    ranks = [EpochSampler(10, 2, world=2, rank=r, seed=5) for r in (0, 1)]
    seen = [i for _ in range(2) for s in ranks for i in s.next()]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 8  # disjoint shards within an epoch
    fresh = EpochSampler(10, 2, world=2, rank=0, seed=5)
    fresh.load_state(ranks[0].state())
    assert [fresh.next() for _ in range(3)] == [ranks[0].next() for _ in range(3)]  # crosses into epoch 1


def test_a_sampler_without_one_batch_names_the_data_and_flag():
    from rlhf.errors import DataError
    from rlhf.ppo.data import EpochSampler

    with pytest.raises(
        DataError,
        match=r"prompts of --dataset_dir d .*: 3 item\(s\), fewer than one batch of 2 per process x 2",
    ):
        EpochSampler(3, 2, world=2, what="prompts of --dataset_dir d (--per_device_train_batch_size)")


def test_a_pretraining_data_error_names_its_flag(tmp_path):
    from rlhf.errors import DataError
    from rlhf.ppo.data import load_pretrain

    with pytest.raises(DataError, match=r"^--pretrain_dataset_dir: .*missing: no such file or directory"):
        load_pretrain(str(tmp_path / "missing"), None, 8, None)


def test_long_prompts_keep_their_bos_and_end_and_are_counted(caplog):
    """A prompt over --max_prompt_length keeps its BOS and its last tokens (as SFT and the reward model cut
    theirs), and the log says how many were cut, naming the data and the flag."""
    from rlhf.ppo.data import cut_prompts

    ids = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [30, 31, 32, 33]]
    with caplog.at_level("WARNING"):
        cut = cut_prompts(ids, 4, bos_id=1, where="prompts.jsonl")
    assert cut == [[1, 12, 13, 14], [1, 20, 21], [30, 31, 32, 33]]
    assert "prompts.jsonl: 1 of 3 prompts were longer than --max_prompt_length 4" in caplog.text
    assert cut_prompts(ids[1:2], 4, bos_id=1, where="x") == [[1, 20, 21]]  # nothing cut, nothing logged
    assert cut_prompts([[1, 5, 6]], 1, bos_id=1, where="x") == [[6]]


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_top_k_0_samples_from_the_whole_vocabulary(models, engine):
    """``--top_k 0`` is off for both generators: HF generate must not fall back to its default top-k of 50,
    so tokens outside the 50 most likely are drawn as often as the model gives them probability."""
    prompt = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad(), models.generation_model() as actor:
        probs = actor(input_ids=prompt).logits[0, -1].softmax(-1)
    tail = probs.argsort(descending=True)[50:]
    sampling = SamplingConfig(max_new_tokens=1, eos_token_id=2, pad_token_id=0)
    generator = build_generator(
        engine, models.generation_model, sampling, max_prompt_length=4, max_batch_size=512
    )
    torch.manual_seed(0)
    first = generator.generate(prompt.repeat(512, 1), torch.ones(512, 4, dtype=torch.long)).response_ids[:, 0]
    drawn = torch.isin(first, tail).float().mean()
    assert abs(drawn - probs[tail].sum()) < 0.1, (drawn, probs[tail].sum())


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_generator_logprobs_equal_the_eval_forward(models, tiny_llama, engine):
    """The sampling log-probs the generator returns (the PPO loop's old log-probs; HF generate's or the
    rollout engine's) equal the actor's eval-mode log-probs of the sampled tokens at the sampling
    temperature, before top-k (0 after the mask)."""
    tok = load_tokenizer(str(tiny_llama), padding_side="left")
    prompts = [tok("Tell me how you feel about cats.")["input_ids"], tok("Hi")["input_ids"]]
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=5, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    out = generator_for(engine, models, sampling).generate(prompt_ids, prompt_mask)
    ids, mask = torch.cat([prompt_ids, out.response_ids], 1), torch.cat([prompt_mask, out.response_mask], 1)
    batch = SequenceBatch(ids, mask, prompt_ids.shape[1])
    with torch.no_grad():
        expected, _ = models.policy_logprobs(batch, 0.7)
    assert out.logprobs.shape == out.response_ids.shape
    torch.testing.assert_close(out.logprobs, expected * out.response_mask, atol=1e-4, rtol=1e-4)
    assert (out.logprobs[out.response_mask.bool()] < 0).all()


def test_separate_reward_model_scores_the_last_real_token_as_the_reward_stage_trains_it(tiny_llama, tmp_path):
    """--reward_model_path with no pad token in its config (common for llama-family RMs) and a batch whose
    pad is the EOS: each score is the head at the row's last real token (its EOS), as an unpadded forward
    of that row reads it; HF's own pooling would read the token before the EOS, or refuse the batch."""
    from rlhf.ppo.peft_factory import _separate_reward_model
    from rlhf.ppo.rewards import SequenceClassifierScorer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path / "rm")
    margs = SimpleNamespace(torch_dtype="float32", trust_remote_code=False)
    scorer = SequenceClassifierScorer(
        _separate_reward_model(str(tmp_path / "rm"), margs), torch.device("cpu")
    )
    eos = 2
    prompts, responses = [[1, 10, 11, 12], [1, 13]], [[20, 21, eos], [22, 23, 24, eos]]
    prompt_ids, prompt_mask = left_pad(prompts, eos)
    response_ids = torch.tensor([[20, 21, eos, eos], [22, 23, 24, eos]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = SequenceBatch(
        torch.cat([prompt_ids, response_ids], 1),
        torch.cat([prompt_mask, response_mask], 1),
        prompt_ids.shape[1],
    )
    captured = []  # the score head at the last position of each unpadded row
    hook = model.score.register_forward_hook(lambda _m, _i, out: captured.append(out[0, -1, 0]))
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            model(input_ids=torch.tensor([prompt + response]))
    hook.remove()
    expected = captured
    torch.testing.assert_close(scorer.score(batch, [], []), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_a_reward_model_with_its_own_tokenizer_gets_an_eos_only_where_the_response_ended(tiny_llama):
    """Re-tokenized for a reward model of another vocabulary, a response cut at --max_response_length used
    to get that model's EOS appended anyway: scored as if it had ended, unlike with a shared vocabulary."""
    from rlhf.models import load_tokenizer
    from rlhf.ppo.rewards import SequenceClassifierScorer

    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    scorer = SequenceClassifierScorer(model, torch.device("cpu"), tokenizer)
    scorer.policy_eos = (2, 7)  # the rollout's EOS ids (tokenizer + generation_config)
    prompt_ids, prompt_mask = left_pad([[1, 10], [1, 11]], 0)
    response_ids = torch.tensor([[20, 7, 0], [21, 22, 23]])  # row 0 ended on the second EOS id, row 1 was cut
    batch = SequenceBatch(
        torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, (response_ids != 0).long()], 1), 2
    )
    seen = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    scorer.score(batch, ["a b", "a b"], ["c", "c"])
    mask = seen[0] != tokenizer.pad_token_id
    last = [row[m][-1].item() for row, m in zip(seen[0], mask)]
    assert last[0] == tokenizer.eos_token_id and last[1] != tokenizer.eos_token_id


def test_a_reward_model_with_its_own_tokenizer_gets_one_bos_when_the_template_wrote_it(tiny_llama):
    """A chat template that writes the BOS into the prompt text (Llama-3's, Llama-2's [INST]): re-tokenized
    for a reward model of another vocabulary, the prompt used to get a second BOS from the tokenizer, which
    the reward stage never trained on."""
    from rlhf.models import load_tokenizer
    from rlhf.ppo.rewards import SequenceClassifierScorer

    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    scorer = SequenceClassifierScorer(model, torch.device("cpu"), tokenizer)
    prompt_ids, prompt_mask = left_pad([[1, 10], [1, 11]], 0)
    response_ids = torch.tensor([[20, 21], [22, 23]])
    batch = SequenceBatch(torch.cat([prompt_ids, response_ids], 1), torch.ones(2, 4, dtype=torch.long), 2)
    seen = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    bos = tokenizer.bos_token
    scorer.score(batch, [f"{bos}user: a b", "user: a b"], ["c", "c"])
    rows = [row[row != tokenizer.pad_token_id].tolist() for row in seen[0]]
    assert [row.count(tokenizer.bos_token_id) for row in rows] == [1, 1]
    assert rows[0] == rows[1]  # the BOS in the text and the one the tokenizer adds are the same token


def test_a_response_ending_on_another_eos_id_is_scored_at_the_eos_the_reward_model_trained_on():
    """Llama-3: the rollout ends at <|eot_id|> (generation_config.json) or <|end_of_text|> (the tokenizer's,
    the one the reward stage appends): the reward model reads its score at the EOS it was trained on."""
    from rlhf.ppo.rewards import ending_as_trained

    eos, eot, pad = 2, 7, 0
    prompt_ids, prompt_mask = left_pad([[1, 10], [1, 11], [1, 7], [1, 12]], pad)
    response_ids = torch.tensor([[20, eot, pad], [21, eos, pad], [22, 23, 24], [pad, pad, pad]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    batch = SequenceBatch(
        torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1), 2
    )
    out = ending_as_trained(batch, (eos, eot), eos)
    assert out.response_ids.tolist() == [[20, eos, pad], [21, eos, pad], [22, 23, 24], [pad, pad, pad]]
    assert out.input_ids[3, :2].tolist() == [1, 12] and torch.equal(out.attention_mask, batch.attention_mask)
    assert ending_as_trained(batch, (eos,), eos) is batch  # one EOS id: nothing to map
    assert torch.equal(
        ending_as_trained(batch, (eos, eot), eot).response_ids[1], torch.tensor([21, eot, pad])
    )


def test_both_reward_scorers_read_a_response_ended_on_another_eos_id_at_the_trained_eos(tiny_llama):
    from rlhf.ppo.rewards import AdapterScorer, SequenceClassifierScorer

    eos, eot, pad = 2, 7, 0
    prompt_ids, prompt_mask = left_pad([[1, 10], [1, 11]], pad)
    response_ids = torch.tensor([[20, eot, pad], [21, 22, 23]])  # row 0 ended on the other id, row 1 was cut
    batch = SequenceBatch(
        torch.cat([prompt_ids, response_ids], 1),
        torch.cat([prompt_mask, torch.tensor([[1, 1, 0], [1, 1, 1]])], 1),
        2,
    )
    seen = []
    models = SimpleNamespace(reward_scores=lambda b: seen.append(b.input_ids) or torch.zeros(2))
    adapter = AdapterScorer(models)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    separate = SequenceClassifierScorer(model, torch.device("cpu"), None, reward_eos=eos)
    for scorer in (adapter, separate):
        scorer.policy_eos, scorer.reward_eos = (eos, eot), eos
        scorer.score(batch, [], [])
    for ids in seen:
        assert (
            ids[0, 3].item() == eos and ids[1, 4].item() == 23
        )  # the ended row at EOS, the cut one as it was
        assert torch.equal(ids[:, :3], batch.input_ids[:, :3])


def test_the_session_tells_the_reward_scorer_the_rollouts_eos_ids(tiny_llama, tmp_path, monkeypatch):
    import shutil

    import run_ppo_with_peft
    from rlhf.ppo.rewards import AdapterScorer

    model = tmp_path / "chat"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 7]
    (model / "generation_config.json").write_text(json.dumps(config))
    rm = build_rm_adapter(model, tmp_path / "rm")
    seen = []
    original = AdapterScorer.score
    monkeypatch.setattr(
        AdapterScorer,
        "score",
        lambda self, *a: seen.append((self.policy_eos, self.reward_eos)) or original(self, *a),
    )
    run_ppo_with_peft.main([
        "--sft_model_path", str(model), "--reward_lora_path", str(rm), "--dataset_dir", str(REPO / "sft_data"),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_response_length", "4",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    assert seen and seen[0] == ((config["eos_token_id"][0], 7), config["eos_token_id"][0])


def test_too_few_prompts_for_one_rollout_names_the_flags():
    from rlhf.errors import DataError
    from rlhf.ppo.session import count_total_steps

    ppo = SimpleNamespace(
        rollout_batches=6, ppo_epochs=1, num_samples_per_prompt=1, per_device_mini_train_batch_size=4
    )
    args = SimpleNamespace(
        max_steps=0, per_device_train_batch_size=4, num_train_epochs=1.0, gradient_accumulation_steps=1
    )
    with pytest.raises(
        DataError,
        match="16 prompts make no full rollout of --rollout_batches 6 x --per_device_train_batch_size 4",
    ):
        count_total_steps(16, ppo, args, 1)


def test_epochs_shorter_than_one_optimizer_step_warn(caplog):
    """3 prompts, 2 per rollout, 1 epoch: one rollout of one mini-batch, but a step accumulates 4: the run
    trains its one step on 4 rollouts (as the Trainer's convention has it), and says so."""
    from rlhf.ppo.session import count_total_steps

    ppo = SimpleNamespace(
        rollout_batches=1, ppo_epochs=1, num_samples_per_prompt=1, per_device_mini_train_batch_size=2
    )
    args = SimpleNamespace(
        max_steps=0, per_device_train_batch_size=2, num_train_epochs=1.0, gradient_accumulation_steps=4
    )
    with caplog.at_level("WARNING", logger="rlhf.ppo.session"):
        assert count_total_steps(3, ppo, args, 1) == 1
    assert "makes 1 rollout(s), 1 mini-batch(es) in all, fewer than one optimizer step's" in caplog.text
    assert "the run trains 1 step, on 4 rollouts" in caplog.text
    caplog.clear()
    args.gradient_accumulation_steps = 1
    with caplog.at_level("WARNING", logger="rlhf.ppo.session"):
        assert count_total_steps(3, ppo, args, 1) == 1
    assert not caplog.text


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha_pattern", {"q_proj": 64}),
        ("rank_pattern", {"q_proj": 4}),
        ("use_dora", True),
        ("lora_bias", True),
    ],
)
def test_a_reward_adapter_with_options_the_shared_adapter_drops_is_refused(rm_adapter, tmp_path, key, value):
    """The shared reward adapter is rebuilt from plain LoRA fields: a pattern, DoRA or a LoRA bias would be
    dropped and the rewards silently wrong, so such an adapter is a one-line error."""
    import json
    import shutil

    from rlhf.errors import CheckpointError

    copy = tmp_path / "rm"
    shutil.copytree(rm_adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    assert config.get(key) in (None, {}, False)  # what run_rm_with_peft.py writes: accepted
    config[key] = value
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"the reward adapter uses {key}, which"):
        read_reward_adapter(str(copy))
