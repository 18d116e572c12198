"""Several EOS ids (a chat model's end-of-turn tokens beside the tokenizer's EOS, as its
generation_config.json lists them): every generator ends a response at the first of any, as HF generate
does, and PPO reads the list from the model. And the RoPE types whose decode steps scale positions
differently from one full forward take their old log-probs from a forward."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from test_generation_engine import left_padded, with_lora

from rlhf.generation import SamplingConfig, response_mask_after_eos
from rlhf.generation.base import eos_ids, is_eos
from rlhf.generation.build import build_generator
from rlhf.generation.sampling import suppress_token
from rlhf.models.rope import rope_type
from rlhf.ppo.session import sampling_config


def test_eos_helpers_take_one_id_or_several():
    assert eos_ids(None) == () and eos_ids(2) == (2,) and eos_ids([2, 7, 2]) == (2, 7)
    tokens = torch.tensor([[5, 7, 3, 2], [2, 5, 5, 5], [5, 5, 5, 5]])
    assert is_eos(tokens, (2, 7)).tolist()[0] == [False, True, False, True]
    assert is_eos(tokens, 5).tolist()[1] == [False, True, True, True] and not is_eos(tokens, None).any()
    assert response_mask_after_eos(tokens, (2, 7)).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert response_mask_after_eos(tokens, 2).tolist()[0] == [1, 1, 1, 1]
    scores = suppress_token(torch.zeros(2, 9), (2, 7))
    assert torch.isinf(scores[:, [2, 7]]).all() and torch.isfinite(scores[:, [0, 1, 3]]).all()


@pytest.mark.parametrize("kind", ["static", "hf"])
def test_a_response_ends_at_any_eos_id(tiny_llama, kind):
    """The token every row picks first is made a second EOS id: all rows end after it, as HF generate
    ends them with that list (before, only the tokenizer's EOS ended a row and they ran to the limit)."""
    model = with_lora(tiny_llama)
    ids, mask = left_padded(tiny_llama)
    tokenizer_eos = 2
    with torch.no_grad():  # the greedy first tokens
        first = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=1,
                               pad_token_id=0)[:, -1]  # fmt: skip
    eos = (tokenizer_eos, *dict.fromkeys(first.tolist()))
    sampling = SamplingConfig(
        max_new_tokens=6, min_new_tokens=0, temperature=0.0, eos_token_id=eos, pad_token_id=0
    )
    generator = build_generator(
        kind, lambda: nullcontext(model), sampling, max_prompt_length=ids.shape[1], max_batch_size=len(ids)
    )
    generator.prepare()
    out = generator.generate(ids, mask)
    assert out.response_mask.sum(1).tolist() == [1] * len(ids)
    assert out.response_ids[:, 0].tolist() == first.tolist()
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                   eos_token_id=list(eos), pad_token_id=0)  # fmt: skip
    assert (reference[:, ids.shape[1] + 1 :] == 0).all()  # HF generate ends them there too


def test_ppo_sampling_adds_the_models_generation_config_eos_ids():
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    ppo = SimpleNamespace(max_response_length=8, min_response_length=1, temperature=1.0, top_k=0, top_p=1.0)
    assert sampling_config(ppo, tokenizer).eos_token_id == 2
    assert sampling_config(ppo, tokenizer, 2).eos_token_id == 2
    assert sampling_config(ppo, tokenizer, [128001, 2, 128009]).eos_token_id == (2, 128001, 128009)
    zero = SimpleNamespace(
        eos_token_id=0, pad_token_id=0
    )  # SmolLM's EOS is id 0: it must still end responses
    assert sampling_config(ppo, zero).eos_token_id == 0 and sampling_config(ppo, zero, 0).eos_token_id == 0
    assert sampling_config(ppo, SimpleNamespace(eos_token_id=None, pad_token_id=0)).eos_token_id is None


def test_rope_type_is_read_through_the_adapter_wrapper(tiny_llama, tmp_path):
    """``--old_logprobs auto`` asks it: dynamic and longrope rescale positions with the longest one seen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert rope_type(with_lora(tiny_llama)) == "default"
    config = AutoConfig.from_pretrained(tiny_llama)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert rope_type(AutoModelForCausalLM.from_config(config)) == "dynamic"
