"""The rollout engine on the tensor-parallel model: world size 1 in this process, world size 2 under torchrun.

World size 2 runs this file as a ``torchrun --nproc_per_node 2`` script (gloo on CPU); rank 0 saves what
every rank generated and the test compares it with Hugging Face ``generate``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun

FAMILIES = ["llama", "mistral", "mixtral", "qwen2"]
PROMPTS = ["Hi", "Tell me how you feel about cats.", "x y", "The weather today is"]
NEW = 10


def left_padded(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def hf_greedy(model_dir: Path) -> torch.Tensor:
    """Plain transformers' greedy responses (no EOS: every row runs NEW tokens)."""
    from transformers import AutoModelForCausalLM

    ids, mask = left_padded(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW
        )
    return out[:, ids.shape[1] :]


def tp_generate(model_dir: Path, rank: int, world_size: int, lora: bool = False) -> dict:
    """Greedy and sampled generations of the TP model through the engine (every rank runs this)."""
    from rlhf.generation import SamplingConfig
    from rlhf.generation.build import decoder_for
    from rlhf.generation.engine import RolloutEngine
    from rlhf.tp.loading import load_tp_model

    ids, mask = left_padded(model_dir)
    model = load_tp_model(str(model_dir), rank=rank, world_size=world_size, device=torch.device("cpu")).eval()
    if lora:
        from rlhf.tp.lora import apply_lora, lora_layers

        apply_lora(model, r=4, alpha=8, targets=["all"])
        generator = torch.Generator().manual_seed(1)  # the same B on every rank; each keeps its slice
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0, 0.2, generator=generator)
    engine = RolloutEngine(decoder_for(model), max_batch_size=8, max_length=64)
    greedy = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0)
    sampled = SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_k=50, top_p=0.95)
    rng = torch.Generator().manual_seed(rank)  # different RNG per rank: the broadcast keeps them equal
    return {
        "model": model,
        "greedy": engine.generate(ids, mask, greedy),
        "sampled": engine.generate(ids, mask, sampled, generator=rng),
        "ids": ids,
        "mask": mask,
    }


@pytest.fixture(scope="module")
def world_of_one():
    from rlhf.tp.distributed import init_model_parallel, shutdown

    init_model_parallel("gloo")
    yield
    shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_world_size_1_greedy_matches_hf_generate(family, tiny_model_factory, world_of_one):
    model_dir = tiny_model_factory(family)
    out = tp_generate(model_dir, 0, 1)["greedy"]
    assert torch.equal(out.response_ids, hf_greedy(model_dir))


def test_world_size_1_with_lora_matches_a_teacher_forced_forward(tiny_model_factory, world_of_one):
    """With an active TP LoRA (forward hooks), the sampled tokens' log-probs are the model's own, and
    greedy decoding picks each step's argmax of a full forward."""
    model_dir = tiny_model_factory("llama")
    run = tp_generate(model_dir, 0, 1, lora=True)
    model, ids, mask = run["model"], run["ids"], run["mask"]
    for name in ("greedy", "sampled"):
        out = run[name]
        full_ids = torch.cat([ids, out.response_ids], 1)
        with torch.no_grad():
            logits = model(full_ids, torch.cat([mask, out.response_mask], 1))[:, ids.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs, expected * out.response_mask, atol=1e-5, rtol=0)
    greedy = run["greedy"]
    assert not torch.equal(greedy.response_ids, hf_greedy(model_dir))  # the adapter changed the output


def test_a_changed_lora_scale_is_another_graph_key(tiny_model_factory, world_of_one):
    """The TP LoRA hook multiplies by the float ``lora_scale``, a constant in a captured graph."""
    from rlhf.generation.build import decoder_for
    from rlhf.tp.lora import lora_layers

    model = tp_generate(tiny_model_factory("llama"), 0, 1, lora=True)["model"]
    decoder = decoder_for(model)
    before = decoder.state_key()
    assert decoder.state_key() == before
    next(iter(lora_layers(model).values())).lora_scale *= 2
    assert decoder.state_key() != before


def test_hf_engine_refuses_the_tp_model(tiny_model_factory, world_of_one):
    from contextlib import nullcontext

    from rlhf.errors import ConfigError
    from rlhf.generation import SamplingConfig
    from rlhf.generation.build import build_generator
    from rlhf.generation.engine import EngineGenerator
    from rlhf.tp.loading import load_tp_model

    model = load_tp_model(str(tiny_model_factory("llama")), rank=0, world_size=1, device=torch.device("cpu"))
    sampling = SamplingConfig(max_new_tokens=4)
    kwargs = dict(max_prompt_length=8, max_batch_size=2)
    with pytest.raises(ConfigError, match="--generation_engine hf: the tensor-parallel model"):
        build_generator("hf", lambda: nullcontext(model), sampling, **kwargs)
    assert isinstance(
        build_generator("auto", lambda: nullcontext(model), sampling, **kwargs), EngineGenerator
    )


@pytest.mark.slow
def test_world_size_2_matches_hf_generate_and_ranks_agree(tiny_model_factory, tmp_path):
    names = ["llama", "qwen2"]
    dirs = {name: tiny_model_factory(name) for name in names}
    command = torchrun(2) + [__file__, str(tmp_path)] + [f"{n}={d}" for n, d in dirs.items()]
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in names:
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert torch.equal(saved["greedy"][0], hf_greedy(dirs[name]))
        assert torch.equal(saved["greedy"][0], saved["greedy"][1])
        assert torch.equal(saved["sampled"][0], saved["sampled"][1])  # rank 1 sampled with another seed
        assert torch.equal(saved["sampled_logprobs"][0], saved["sampled_logprobs"][1])  # of those tokens


def worker(out: Path, cases: list[str]) -> None:
    """torchrun entry: every case at world size 2; rank 0 saves each rank's greedy and sampled tokens."""
    import torch.distributed as dist

    from rlhf.tp.distributed import init_model_parallel, shutdown

    rank, world_size = init_model_parallel("gloo")
    for case in cases:
        name, model_dir = case.split("=", 1)
        run = tp_generate(Path(model_dir), rank, world_size)
        saved = {}
        tensors = {
            "greedy": run["greedy"].response_ids,
            "sampled": run["sampled"].response_ids,
            "sampled_logprobs": run["sampled"].logprobs,
        }
        for key, tensor in tensors.items():
            tensor = tensor.contiguous()
            pieces = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(pieces, tensor)
            saved[key] = pieces
        if rank == 0:
            torch.save(saved, out / f"{name}.pt")
    shutdown()  # barrier, then free the groups before exit (see rlhf.tp.distributed)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
