"""LoRA on TP layers: equals peft's LoRA at world size 1, is world-size invariant (torchrun, 2 ranks), trains,
and merges into the shards without changing the outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun

from rlhf.errors import CheckpointError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED = {  # LoRA weight -> split dim of its gradient across ranks (None: replicated)
    "layers.0.attention.wq.lora_A.weight": None,  # column layer: A replicated
    "layers.0.attention.wq.lora_B.weight": 0,  # column layer: B split on the output
    "layers.1.feed_forward.w2.lora_A.weight": 1,  # row layer: A split on the input
    "layers.1.feed_forward.w2.lora_B.weight": None,  # row layer: B replicated
}
DRIFTING = "layers.0.attention.wq.lora_A.weight"  # replicated: rank 1 perturbs its gradient before clipping


def fill_b(model, seed: int = 1) -> None:
    """Give every B non-zero values drawn at full size (the same adapter at any world size)."""
    import fairscale.nn.model_parallel.initialize as fs_init
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    from rlhf.tp.lora import lora_layers

    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    for index, layer in enumerate(lora_layers(model).values()):
        g = torch.Generator().manual_seed(seed * 1000 + index)
        full = torch.randn(layer.out_features, layer.lora_B.weight.shape[1], generator=g) * 0.1
        local = full.chunk(world_size, dim=0)[rank] if isinstance(layer, ColumnParallelLinear) else full
        with torch.no_grad():
            layer.lora_B.weight.copy_(local)


def batch(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    enc = tokenizer(["I love cats and dogs.", "The weather is nice"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def loss_of(logits, ids, mask) -> torch.Tensor:
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100
    )


def run_lora(model_dir: Path, rank: int, world_size: int, dropout: float = 0.0) -> dict:
    """Logits, LoRA gradients and their norm with a fixed adapter, then the logits after merging it (with
    ``dropout``: logits and gradients only, every rank's RNG seeded alike, as the trainers do)."""
    from rlhf.tp.distributed import clip_grad_norm
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, merge_lora

    ids, mask = batch(model_dir)
    model = load_tp_model(str(model_dir), rank=rank, world_size=world_size, device=torch.device("cpu"))
    apply_lora(model, r=4, alpha=8, targets=["all"], dropout=dropout)
    fill_b(model)
    torch.manual_seed(3)
    logits = model(ids, mask)
    if dropout:
        loss_of(logits, ids, mask).backward()
        params = dict(model.named_parameters())
        return {"logits": logits.detach(), "grads": {key: params[key].grad.clone() for key in CHECKED}}
    loss_of(logits, ids, mask).backward()
    params = dict(model.named_parameters())
    grads = {key: params[key].grad.clone() for key in CHECKED}
    drifting = params[DRIFTING].grad
    drifting[0, 0] += rank * 1e-3  # as if a non-deterministic kernel had summed in another order
    norm = clip_grad_norm(model)  # over the LoRA gradients, split ones summed over ranks
    synced = drifting.clone()  # every rank: rank 0's gradient again
    assert merge_lora(model) == 14
    with torch.no_grad():
        merged = model(ids, mask)
    return {
        "logits": logits.detach(),
        "merged": merged,
        "grads": grads,
        "keys": sorted(model.state_dict()),
        "norm": norm,
        "synced": synced,
    }


def run_seeded(model_dir: Path, rank: int, world_size: int) -> dict:
    """What the trainers do: seed the RNG, build the model and its adapter (LoRA dropout 0.2), then train
    (a training-mode forward and backward). The RNG state after ``apply_lora``, the logits and the loss."""
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora

    ids, mask = batch(model_dir)
    torch.manual_seed(5)
    model = load_tp_model(str(model_dir), rank=rank, world_size=world_size, device=torch.device("cpu"))
    apply_lora(model, r=4, alpha=8, targets=["all"], dropout=0.2)
    rng = torch.get_rng_state()
    fill_b(model)  # its own generators
    logits = model.train()(ids, mask)
    loss = loss_of(logits, ids, mask)
    loss.backward()
    return {"rng": rng, "logits": logits.detach(), "loss": loss.detach()}


def test_building_the_adapter_draws_nothing_from_the_rng(tiny_model_factory, world_of_one):
    """The LoRA dropout masks come from the default RNG, seeded alike on every rank: building the adapter
    must not draw from it (an ``nn.Linear``'s default init would draw as many numbers as the local shard
    has, so the masks after it would change with the TP degree)."""
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers

    model = load_tp_model(str(tiny_model_factory("llama")), rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    apply_lora(model, r=4, alpha=8, targets=["all"], dropout=0.2)
    assert torch.equal(torch.get_rng_state(), before)
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A.weight.abs().sum() > 0 and not layer.lora_B.weight.any()
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_matches_peft_lora_and_merges(tiny_model_factory, world_of_one):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import HF_TARGETS, apply_lora, lora_layers, merge_lora

    model_dir = tiny_model_factory("llama")
    ids, mask = batch(model_dir)
    ours = load_tp_model(str(model_dir), rank=0, world_size=1, device=torch.device("cpu"))
    plain_keys = sorted(ours.state_dict())
    names = apply_lora(ours, r=4, alpha=8, targets=list(HF_TARGETS))  # Hugging Face names are accepted
    assert len(names) == 14
    fill_b(ours)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    hf_names = {v: k for k, v in HF_TARGETS.items()}
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            _, i, block, proj = name.split(".")
            sub = "self_attn" if block == "attention" else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{sub}.{hf_names[proj]}"
            peft_params[f"{prefix}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            peft_params[f"{prefix}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask)[real], expected[real], atol=2e-5, rtol=1e-4)
        merge_lora(ours)
        torch.testing.assert_close(ours(ids, mask)[real], expected[real], atol=2e-5, rtol=1e-4)
    assert sorted(ours.state_dict()) == plain_keys


def test_lora_trains_only_the_adapter(tiny_model_factory, world_of_one):
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_state_dict

    model_dir = tiny_model_factory("qwen2")
    ids, mask = batch(model_dir)
    model = load_tp_model(str(model_dir), rank=0, world_size=1, device=torch.device("cpu"))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=8, alpha=16, targets=["q_proj", "v_proj", "w2"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = loss_of(model(ids, mask), ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert len(lora_state_dict(model)) == 2 * 3 * 2  # A and B, 3 targets, 2 layers


def test_adapter_and_scalar_head_stay_float32_on_a_bf16_base(tiny_model_factory, world_of_one):
    """A bf16 model (what --dtype auto gives on a GPU) gets float32 LoRA weights and a float32 v_head, as
    PEFT keeps its adapters: AdamW steps of about lr are far below one bf16 step of a weight (a bf16 A would
    not move at lr 1e-5). The forward stays bf16 and equals the adapter computed by hand."""
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers

    model_dir = tiny_model_factory("llama")
    ids, mask = batch(model_dir)
    cpu = torch.device("cpu")
    model = load_tp_model(str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.bfloat16)
    apply_lora(model, r=4, alpha=8, targets=["all"])
    fill_b(model)
    layer = next(iter(lora_layers(model).values()))
    assert layer.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        delta = layer.lora_B(layer.lora_A(x.float())) * layer.lora_scale
        expected = torch.nn.functional.linear(x, layer.weight) + delta.to(torch.bfloat16)
        torch.testing.assert_close(layer(x), expected)
    logits = model(ids, mask)
    assert logits.dtype == torch.bfloat16
    loss_of(logits.float(), ids, mask).backward()
    a = layer.lora_A.weight
    before = a.detach().clone()
    torch.optim.AdamW([a], lr=1e-5).step()
    assert not torch.equal(a, before)  # in bf16 this step would round away
    scorer = load_tp_model(
        str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.bfloat16, scalar_head=True
    )
    assert scorer.v_head.weight.dtype == torch.float32
    assert scorer.tok_embeddings.weight.dtype == torch.bfloat16
    assert scorer(ids, mask).dtype == torch.float32


def test_apply_lora_takes_the_shared_lora_spec(tiny_model_factory, world_of_one):
    """``apply_lora(model, LoraSpec)`` builds the same adapter as the keyword form (kept for old callers)."""
    from rlhf.models.lora import LoraSpec
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers, lora_state_dict

    model_dir = tiny_model_factory("llama")
    models = [
        load_tp_model(str(model_dir), rank=0, world_size=1, device=torch.device("cpu")) for _ in range(2)
    ]
    spec = LoraSpec(rank=4, alpha=16.0, dropout=0.0, targets=["q_proj", "down_proj"])
    names = apply_lora(models[0], spec, seed=3)
    assert names == apply_lora(models[1], r=4, alpha=16.0, targets=["q_proj", "down_proj"], seed=3)
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["w2", "w2", "wq", "wq"]
    a, b = lora_state_dict(models[0]), lora_state_dict(models[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {layer.lora_scale for layer in lora_layers(models[0]).values()} == {spec.scale}
    with pytest.raises(ConfigError, match="--lora_rank must be > 0"):
        apply_lora(models[0], LoraSpec(rank=-1))


def test_merged_model_saves_as_shards_that_merge_to_hf(tiny_model_factory, tmp_path, world_of_one):
    from transformers import AutoModelForCausalLM

    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, merge_lora
    from rlhf.tp.shard_dir import read_params, save_model_shards
    from rlhf.tp.split_merge import merge_to_dir

    model_dir = tiny_model_factory("mixtral")
    ids, mask = batch(model_dir)
    model = load_tp_model(str(model_dir), rank=0, world_size=1, device=torch.device("cpu"))
    apply_lora(model, r=4, alpha=8)
    fill_b(model)
    with torch.no_grad():
        expected = model(ids, mask)
    with pytest.raises(CheckpointError, match="merge the LoRA weights"):
        save_model_shards(model, tmp_path / "shards", model_dir)
    merge_lora(model)
    save_model_shards(model, tmp_path / "shards", model_dir)
    assert read_params(tmp_path / "shards")["head"] == "lm"
    reloaded = load_tp_model(str(tmp_path / "shards"), rank=0, world_size=1, device=torch.device("cpu"))
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask)[real], expected[real], atol=2e-5, rtol=1e-4)
    merge_to_dir(tmp_path / "shards", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[real], expected[real], atol=2e-5, rtol=1e-4)


def test_clip_grad_norm_matches_torch_at_world_size_1(tiny_model_factory, world_of_one):
    from rlhf.tp.distributed import clip_grad_norm
    from rlhf.tp.loading import load_tp_model

    model_dir = tiny_model_factory("mixtral")
    ids, mask = batch(model_dir)
    model = load_tp_model(str(model_dir), rank=0, world_size=1, device=torch.device("cpu"))
    loss_of(model(ids, mask), ids, mask).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert clip_grad_norm(model, max_norm=0.1) == pytest.approx(float(expected), rel=1e-5)
    clipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    assert float(clipped) == pytest.approx(0.1, rel=1e-3)


def test_bad_targets_are_user_errors(tiny_model_factory, world_of_one):
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora

    model = load_tp_model(str(tiny_model_factory("llama")), rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a TP projection"):
        apply_lora(model, r=4, alpha=8, targets=["c_attn"])
    with pytest.raises(ConfigError, match="must be > 0"):
        apply_lora(model, r=0, alpha=8)


@pytest.mark.slow
def test_world_size_2_lora_equals_world_size_1(tiny_model_factory, tmp_path, world_of_one):
    model_dir = tiny_model_factory("llama")
    env = script_env()
    command = torchrun(2)
    command += [__file__, str(model_dir), str(tmp_path / "tp2.pt")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tp2 = torch.load(tmp_path / "tp2.pt", weights_only=True)
    tp1 = run_lora(model_dir, 0, 1)
    real = batch(model_dir)[1].bool()
    torch.testing.assert_close(tp2["logits"][real], tp1["logits"][real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tp2["merged"][real], tp1["logits"][real], atol=2e-5, rtol=1e-4)
    for key in CHECKED:
        torch.testing.assert_close(tp2["grads"][key], tp1["grads"][key], atol=1e-5, rtol=1e-4, msg=key)
    assert tp2["keys"] == tp1["keys"]
    assert tp2["norm"] == pytest.approx(tp1["norm"], rel=1e-5)
    # with LoRA dropout: a row layer's input slices get independent masks, the ones one process draws
    tp1 = run_lora(model_dir, 0, 1, dropout=0.3)
    torch.testing.assert_close(tp2["dropout"]["logits"][real], tp1["logits"][real], atol=2e-5, rtol=1e-4)
    for key in CHECKED:
        torch.testing.assert_close(
            tp2["dropout"]["grads"][key], tp1["grads"][key], atol=1e-5, rtol=1e-4, msg=key
        )
    # seeded before the model and its adapter are built, as the trainers do: the same masks at TP=1 and 2
    tp1 = run_seeded(model_dir, 0, 1)
    assert torch.equal(tp2["seeded"]["rng"], tp1["rng"])
    torch.testing.assert_close(tp2["seeded"]["logits"][real], tp1["logits"][real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tp2["seeded"]["loss"], tp1["loss"], atol=1e-6, rtol=1e-5)


def worker(model_dir: Path, out: Path) -> None:
    """torchrun entry: the LoRA run at world size 2; rank 0 saves it with gradients gathered to full size."""
    import torch.distributed as dist

    from rlhf.tp.distributed import init_model_parallel, shutdown

    rank, world_size = init_model_parallel("gloo")
    result = run_lora(model_dir, rank, world_size)
    result["dropout"] = run_lora(model_dir, rank, world_size, dropout=0.3)
    result["seeded"] = run_seeded(model_dir, rank, world_size)
    for grads in (result["grads"], result["dropout"]["grads"]):
        for key, dim in CHECKED.items():
            pieces = [torch.empty_like(grads[key]) for _ in range(world_size)]
            dist.all_gather(pieces, grads[key].contiguous())
            assert dim is not None or torch.equal(pieces[0], pieces[1]), f"{key}: replicated grads differ"
            grads[key] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    pieces = [torch.empty_like(result["synced"]) for _ in range(world_size)]
    dist.all_gather(pieces, result["synced"])
    assert torch.equal(pieces[0], pieces[1]), "clipping left the replicated gradients different"
    torch.testing.assert_close(pieces[0], result["grads"][DRIFTING])  # rank 0's, unperturbed
    if rank == 0:
        torch.save(result, out)
    shutdown()  # barrier, then free the groups before exit (see rlhf.tp.distributed)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
