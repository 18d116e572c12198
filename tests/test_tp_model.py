"""The TP model against plain transformers: logits, greedy generation and gradients, at world size 1 and 2.

World size 1 runs in this process. World size 2 runs this file as a ``torchrun --nproc_per_node 2`` script
(gloo on CPU) once for every case, and the test compares what rank 0 saved with transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["I love cats.", "How do you feel about the weather today? I think", "x"]
GEN_LEN = 12
GRAD_KEYS = {  # shard key -> (HF parameter, its part for this key, split dim across ranks)
    "layers.0.attention.wq.weight": ("model.layers.0.self_attn.q_proj.weight", None, 0),
    "layers.1.attention.wo.weight": ("model.layers.1.self_attn.o_proj.weight", None, 1),
    "layers.0.attention_norm.weight": ("model.layers.0.input_layernorm.weight", None, None),
    # mixtral: the replicated router and one expert (transformers 5 fuses experts in memory)
    "layers.0.feed_forward.gate.weight": ("model.layers.0.mlp.gate.weight", None, None),
    "layers.0.feed_forward.experts.1.w1.weight": ("model.layers.0.mlp.experts.gate_up_proj", "gate_1", 0),
    "layers.0.feed_forward.experts.1.w2.weight": ("model.layers.0.mlp.experts.down_proj", "expert_1", 1),
}
PARTS = {"gate_1": lambda g: g[1].chunk(2)[0], "expert_1": lambda g: g[1]}


def batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """The prompts left-padded (ids, mask) and as plain id lists."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"], [tokenizer(p)["input_ids"] for p in prompts]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over real tokens."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100
    )


def hf_reference(model_dir: Path, prompts: list[str] = PROMPTS) -> dict:
    """Logits, greedy continuations (EOS cut) and gradients of plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, mask, _ = batch(tokenizer, prompts)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logits = model(input_ids=ids, attention_mask=mask).logits
    lm_loss(logits, ids, mask).backward()
    params = dict(model.named_parameters())
    grads = {}
    for ours, (hf, part, _) in GRAD_KEYS.items():
        if hf in params:
            grads[ours] = PARTS[part](params[hf].grad) if part else params[hf].grad
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_LEN, do_sample=False)
    eos = tokenizer.eos_token_id
    generated = [row[ids.shape[1] :].tolist() for row in out]
    generated = [row[: row.index(eos)] if eos in row else row for row in generated]
    return {"logits": logits.detach(), "mask": mask, "tokens": generated, "grads": grads}


def run_tp(ckpt_dir: Path, rank: int, world_size: int, prompts: list[str] = PROMPTS) -> dict:
    """Logits, greedy continuations and this rank's gradients of the TP model."""
    from contextlib import nullcontext

    from transformers import AutoTokenizer

    from rlhf.generation import SamplingConfig, build_generator
    from rlhf.tp.loading import load_tp_model

    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    ids, mask, _ = batch(tokenizer, prompts)
    model = load_tp_model(str(ckpt_dir), rank=rank, world_size=world_size, device=torch.device("cpu"))
    logits = model(ids, mask)
    lm_loss(logits, ids, mask).backward()
    params = dict(model.named_parameters())
    grads = {}
    for key in GRAD_KEYS:
        if key in params:  # an expert no token was routed to has no gradient: zero, as in transformers
            grads[key] = params[key].grad if params[key].grad is not None else torch.zeros_like(params[key])
    eos = tokenizer.eos_token_id
    sampling = SamplingConfig(GEN_LEN, min_new_tokens=0, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    generator = build_generator(
        "static",
        lambda: nullcontext(model),
        sampling,
        max_prompt_length=ids.shape[1],
        max_batch_size=len(ids),
    )
    out = generator.generate(ids, mask)  # the rollout engine, greedy
    tokens = [row[:n].tolist() for row, n in zip(out.response_ids, out.response_mask.sum(1))]
    tokens = [row[:-1] if row and row[-1] == eos else row for row in tokens]  # EOS cut, as in the reference
    return {"logits": logits.detach(), "tokens": tokens, "grads": grads}


def assert_matches(ours: dict, ref: dict, grads: bool = True) -> None:
    real = ref["mask"].bool()
    torch.testing.assert_close(ours["logits"][real], ref["logits"][real], atol=2e-5, rtol=1e-4)
    assert ours["tokens"] == ref["tokens"]
    if grads:
        assert sorted(ours["grads"]) == sorted(ref["grads"])
        for key, grad in ours["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][key], atol=1e-5, rtol=1e-4, msg=key)


def mistral_window_dir(factory, out: Path) -> Path:
    """The tiny mistral with a 4-token sliding window, so the window shapes the logits."""
    import shutil

    shutil.copytree(factory("mistral"), out)
    config = json.loads((out / "config.json").read_text())
    config["sliding_window"] = 4
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def cases(tiny_model_factory, llama3_rope_copy, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_cases")
    return {
        "llama": tiny_model_factory("llama"),
        "mistral": tiny_model_factory("mistral"),
        "mixtral": tiny_model_factory("mixtral"),
        "qwen2": tiny_model_factory("qwen2"),
        "tied_odd_vocab": tiny_model_factory("llama", tie_word_embeddings=True, vocab_size=511),
        "llama3_rope": llama3_rope_copy(root / "llama3_rope", original_max_position_embeddings=16),
        "sliding_window": mistral_window_dir(tiny_model_factory, root / "window"),
    }


@pytest.fixture(scope="module")
def world_of_one():
    """Model parallelism of size 1 in this process, torn down afterwards."""
    from rlhf.tp.distributed import init_model_parallel, shutdown

    init_model_parallel("gloo")
    yield
    shutdown()


CASE_NAMES = ["llama", "mistral", "mixtral", "qwen2", "tied_odd_vocab", "llama3_rope", "sliding_window"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_world_size_1_matches_transformers(case, cases, world_of_one):
    # transformers' sliding-window masks count pad slots, ours count positions: compare it unpadded
    prompts = PROMPTS[1:2] if case == "sliding_window" else PROMPTS
    assert_matches(run_tp(cases[case], 0, 1, prompts), hf_reference(cases[case], prompts))


def test_sliding_window_changes_logits(cases, world_of_one):
    """Guards the test above: with a 4-token window the logits differ from full attention."""
    from rlhf.tp.loading import load_tp_model

    ids = torch.arange(3, 40)[None]
    full = load_tp_model(str(cases["mistral"]), rank=0, world_size=1, device=torch.device("cpu"))
    window = load_tp_model(str(cases["sliding_window"]), rank=0, world_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        a, b = full(ids), window(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


GLOO_THREADS = """
import os, torch, torch.distributed as dist
from rlhf.tp.distributed import init_model_parallel, process_group_scope

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n.startswith(("pt_gloo", "gloo_")) for n in names)

with process_group_scope():
    init_model_parallel("gloo")
    pieces = [torch.empty(3)]
    dist.all_gather(pieces, torch.ones(3))  # a collective whose tensors the worker thread holds
    assert gloo_threads() > 0
print("left", gloo_threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_process_group_scope_leaves_no_gloo_thread_for_interpreter_exit():
    """A gloo worker thread alive at interpreter exit can abort the process (SIGABRT, "terminate called
    without an active exception") when it drops a collective's tensors: the scope must free them all."""
    result = subprocess.run(
        [sys.executable, "-c", GLOO_THREADS], env=script_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("left 0")


@pytest.mark.slow
def test_world_size_2_matches_world_size_1_and_transformers(cases, tmp_path):
    import checkpoint_split

    names = [n for n in CASE_NAMES if n != "sliding_window"]
    for name in names:
        checkpoint_split.main(
            ["--ckpt_file", str(cases[name]), "--save_path", str(tmp_path / name), "--n", "2"]
        )
    env = script_env()
    command = torchrun(2)
    command += [__file__, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in names:
        ours = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert_matches(ours, hf_reference(cases[name]))


def worker(root: Path) -> None:
    """torchrun entry: every split case at world size 2; rank 0 saves logits, tokens and full gradients."""
    import torch.distributed as dist

    from rlhf.tp.distributed import init_model_parallel, shutdown

    rank, world_size = init_model_parallel("gloo")
    for case in sorted(p for p in root.iterdir() if (p / "params.json").is_file()):
        result = run_tp(case, rank, world_size)
        grads = {}
        for key in result["grads"]:
            dim = GRAD_KEYS[key][2]
            pieces = [torch.empty_like(result["grads"][key]) for _ in range(world_size)]
            dist.all_gather(pieces, result["grads"][key].contiguous())
            grads[key] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        if rank == 0:
            torch.save({**result, "grads": grads}, root / f"{case.name}.pt")
    shutdown()  # barrier, then free the groups before exit (see rlhf.tp.distributed)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
