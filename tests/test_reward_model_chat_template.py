"""A separate reward model with a chat template of its own reads a chat prompt as its stage rendered it.

The reward stage renders a chat row's prompt with the reward model's tokenizer
(:func:`rlhf.data.tokenize_prompt`); PPO's rollouts render it with the policy's. A reward model of another
family (its own vocabulary, or the same one with another template) must score the conversation in its own
rendering, not the policy's template markers re-tokenized.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.data.templates import render_chat_prompt
from rlhf.models import load_tokenizer
from rlhf.ppo.batch import SequenceBatch, left_pad
from rlhf.ppo.rewards import SequenceClassifierScorer

OTHER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture
def reward_dir(tiny_llama, tmp_path):
    """A reward model on the policy's vocabulary whose tokenizer has another chat template."""
    out = tmp_path / "rm"
    shutil.copytree(tiny_llama, out)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(out)
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _seen_ids(scorer: SequenceClassifierScorer, batch, prompts, responses) -> list[list[int]]:
    seen = []
    hook = scorer.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])),
        with_kwargs=True,
    )
    scorer.score(batch, prompts, responses)
    hook.remove()
    ids, mask = seen[0]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _rollout(tokenizer, prompt_texts: list[str], response: str) -> SequenceBatch:
    """The rollout's rows in the policy's ids: each prompt, then ``response`` ended by EOS."""
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = torch.tensor([response_ids] * len(prompts))
    mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], 1)
    return SequenceBatch(torch.cat([prompt_ids, response_ids], 1), mask, prompt_ids.shape[1])


def test_a_chat_prompt_is_rendered_with_the_reward_models_own_template(tiny_llama, reward_dir):
    policy_tok, rm_tok = load_tokenizer(str(tiny_llama)), load_tokenizer(str(reward_dir))
    policy_text = render_chat_prompt(MESSAGES, policy_tok)
    assert "<|user|>" in policy_text  # the policy's markers, which the reward model never saw
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)
    scorer = SequenceClassifierScorer(
        model, torch.device("cpu"), rm_tok, rm_tok.eos_token_id, chats={policy_text: MESSAGES}
    )
    scorer.policy_eos = (policy_tok.eos_token_id,)
    plain = "Below is an instruction.\n### Response:\n"  # not a chat row: the same text for both
    batch = _rollout(policy_tok, [policy_text, plain], "A pear.")
    rows = _seen_ids(scorer, batch, [policy_text, plain], ["A pear.", "A pear."])
    rendered = render_chat_prompt(MESSAGES, rm_tok)
    assert rendered.startswith("[USER] Name a fruit.")
    response = rm_tok("A pear.", add_special_tokens=False)["input_ids"] + [rm_tok.eos_token_id]
    assert rows[0] == rm_tok(rendered)["input_ids"] + response  # its template, its BOS once
    assert rows[1] == rm_tok(plain)["input_ids"] + response


def test_the_factory_tokenizes_again_for_a_reward_model_with_another_template(
    tiny_llama, reward_dir, tmp_path
):
    """Same vocabulary, other chat template, chat prompts: the scorer gets the reward model's tokenizer.
    Same vocabulary and template, or no chat prompts: the rollout's ids are scored as they are."""
    from rlhf.args import parse_args
    from rlhf.ppo.peft_factory import build_models_and_scorer
    from run_ppo_with_peft import ARGUMENT_GROUPS

    policy_tok = load_tokenizer(str(tiny_llama))
    backend = SimpleNamespace(prepare=lambda m: m, device=torch.device("cpu"))
    chats = {render_chat_prompt(MESSAGES, policy_tok): MESSAGES}

    def scorer_for(rm: str, chats) -> SequenceClassifierScorer:
        argv = ["--sft_model_path", str(tiny_llama), "--reward_model_path", rm, "--dataset_dir", "d",
                "--output_dir", str(tmp_path / "out")]  # fmt: skip
        margs = parse_args(ARGUMENT_GROUPS, argv)[0]
        return build_models_and_scorer(margs, policy_tok, backend, with_critic=False, chats=chats)[1]

    assert scorer_for(str(reward_dir), chats).tokenizer.chat_template == OTHER_TEMPLATE
    assert scorer_for(str(reward_dir), {}).tokenizer is None
    same = tmp_path / "same"
    shutil.copytree(reward_dir, same)
    shutil.copy(tiny_llama / "tokenizer_config.json", same / "tokenizer_config.json")
    if (tiny_llama / "chat_template.jinja").exists():
        shutil.copy(tiny_llama / "chat_template.jinja", same / "chat_template.jinja")
    assert load_tokenizer(str(same)).chat_template == policy_tok.chat_template
    assert scorer_for(str(same), chats).tokenizer is None
