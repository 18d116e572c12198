"""Our LoRA forward (:func:`rlhf.models.lora_forward.use_fast_lora_forward`) against PEFT's: the same function
of the weights, without the float32 round trip of the input under autocast and with the scaled output added
by one ``addmm``; merging, saving and mixed-adapter batches as for vanilla LoRA."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from test_generation_engine import rerun_capture
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from rlhf.models.lora import LoraSpec
from rlhf.models.lora_forward import FusedOutputLora, use_fast_lora_forward
from rlhf.ppo.peft_models import build_peft_policy_models
from rlhf.training.trainable import make_trainable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROJECTIONS = 7 * 2  # the tiny llama has 2 layers


def with_adapter(model_dir, fast: bool, dtype=torch.float32, dropout: float = 0.0, names=("default",)):
    """The model with LoRA on every projection, B non-zero; on a bf16 base the adapter is float32 (PEFT's
    default on a half-precision base)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout, init_lora_weights=False
    )
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    if fast:
        assert use_fast_lora_forward(model) == PROJECTIONS * len(names)
    return model


class CountOps(TorchDispatchMode):
    """Per aten op: how many calls (``ops``) and the elements they write (``written``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}
        self.written: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        size = sum(
            t.numel()
            for t in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(t, torch.Tensor)
        )
        self.written[name] = self.written.get(name, 0) + size
        return out


def loss_and_grads(model, ids, autocast: bool):
    counter = CountOps()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), counter:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * PROJECTIONS  # A and B of every projection
    return loss.detach(), grads, counter


def test_in_float32_the_loss_and_gradients_equal_peft(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    model = with_adapter(tiny_llama, True)
    outputs = sum(m.out_features for m in model.modules() if isinstance(m, LoraLinear))
    loss, grads, ops = loss_and_grads(model, ids, autocast=False)
    ref_loss, ref_grads, ref_ops = loss_and_grads(with_adapter(tiny_llama, False), ids, autocast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7)
    # per projection, fused into one addmm: the forward's scale and add over [tokens, out] and the backward's
    # scale (addmm scales its small [tokens, r] and [r, out] gradients instead)
    assert ops.ops.get("addmm", 0) - ref_ops.ops.get("addmm", 0) == PROJECTIONS
    assert ref_ops.ops["add"] - ops.ops["add"] == PROJECTIONS
    assert ref_ops.written["mul"] - ops.written["mul"] > 1.5 * ids.numel() * outputs  # about 2 x that


def test_under_bf16_autocast_no_input_round_trip_and_the_same_loss_and_gradients(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    loss, grads, ops = loss_and_grads(with_adapter(tiny_llama, True, torch.bfloat16), ids, autocast=True)
    ref_loss, ref_grads, ref_ops = loss_and_grads(
        with_adapter(tiny_llama, False, torch.bfloat16), ids, autocast=True
    )
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)  # the sum rounded once instead of 3 times
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    # PEFT: the input to float32 and back in the forward, the input's gradient back from float32 in the backward
    assert ref_ops.ops["_to_copy"] - ops.ops["_to_copy"] >= 2 * PROJECTIONS


def test_the_input_casts_alone_are_bit_identical_under_autocast(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    model = with_adapter(tiny_llama, True, torch.bfloat16)
    for layer in model.modules():
        getattr(layer, "lora_variant", {}).clear()  # PEFT's vanilla forward, input casts still skipped
    loss, grads, _ = loss_and_grads(model, ids, autocast=True)
    ref_loss, ref_grads, _ = loss_and_grads(
        with_adapter(tiny_llama, False, torch.bfloat16), ids, autocast=True
    )
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grad, ref_grads[name]) for name, grad in grads.items())


def test_outside_autocast_a_bf16_base_with_a_float32_adapter_is_peft_bit_for_bit(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        logits = with_adapter(tiny_llama, True, torch.bfloat16)(input_ids=ids).logits
        expected = with_adapter(tiny_llama, False, torch.bfloat16)(input_ids=ids).logits
    assert torch.equal(logits, expected)


def test_merge_unmerge_and_merge_and_unload_match_the_unmerged_forward(tiny_llama):
    ids = torch.randint(4, 200, (2, 12))
    model = with_adapter(tiny_llama, True).eval()
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        for name, param in model.named_parameters():
            if name in weights:
                torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
        plain = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_a_saved_adapter_loads_with_plain_peft_and_gives_the_same_outputs(tiny_llama, tmp_path):
    ids = torch.randint(4, 200, (2, 12))
    model = with_adapter(tiny_llama, True).eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_a_mixed_adapter_batch_runs_each_row_through_its_adapter(tiny_llama):
    ids = torch.randint(4, 200, (3, 12))
    model = with_adapter(tiny_llama, True, names=("actor", "critic")).eval()
    with torch.no_grad():
        for param in (p for n, p in model.named_parameters() if "lora_B.critic" in n):
            param.mul_(-1.0)  # the adapters differ
        mixed = model(input_ids=ids, adapter_names=["actor", "critic", "__base__"]).logits
        expected = []
        for row, name in enumerate(["actor", "critic"]):
            model.set_adapter(name)
            expected.append(model(input_ids=ids[row : row + 1]).logits)
        with model.disable_adapter():
            expected.append(model(input_ids=ids[2:]).logits)
    torch.testing.assert_close(mixed, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_the_stages_build_their_adapters_with_our_forward(tiny_llama, stage):
    spec = LoraSpec(4, 8.0, 0.0, TARGETS)
    if stage == "sft":
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_llama), spec)
        adapters = 1
    else:
        bundle = build_peft_policy_models(
            str(tiny_llama), actor=spec, critic=spec, reward_adapter=None, critic_init="sft"
        )
        model, adapters = bundle.lm, 2
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == PROJECTIONS
    assert all(isinstance(v, FusedOutputLora) for layer in layers for v in layer.lora_variant.values())
    assert sum(len(layer.lora_variant) for layer in layers) == PROJECTIONS * adapters
    assert all(bool(layer.cast_input_dtype_enabled) for layer in layers)  # PEFT's cast outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not any(bool(layer.cast_input_dtype_enabled) for layer in layers)


def bf16_engine(model, copies: bool, **options):
    """The rollout engine on ``model`` under bf16 autocast, reading bf16 copies of the adapters or not."""
    from rlhf.generation.build import decoder_for
    from rlhf.generation.engine import RolloutEngine

    decoder = decoder_for(model)
    if not copies:
        decoder.generating = nullcontext  # the adapters' float32 weights, cast by autocast at every step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return RolloutEngine(decoder, max_batch_size=4, max_length=40, **options)


def generate(engine, ids, seed: int = 0):
    from rlhf.generation import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=8, min_new_tokens=8, temperature=1.0, eos_token_id=2, pad_token_id=0
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return engine.generate(
            ids, torch.ones_like(ids), sampling, generator=torch.Generator().manual_seed(seed)
        )


def test_the_engine_reads_bf16_copies_of_the_adapters_with_the_same_tokens_and_logprobs(tiny_llama):
    ids = torch.randint(4, 200, (3, 6))
    model = with_adapter(tiny_llama, True, torch.bfloat16).eval()
    with_copies, without = generate(bf16_engine(model, True), ids), generate(bf16_engine(model, False), ids)
    assert torch.equal(with_copies.response_ids, without.response_ids)
    assert torch.equal(with_copies.logprobs, without.logprobs)  # the copies round as autocast's casts do
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert all(m._rlhf_rollout_copies[torch.bfloat16]["default"][0].dtype == torch.bfloat16 for m in layers)


def test_the_copies_follow_in_place_updates_and_are_read_only_while_generating(tiny_llama):
    ids = torch.randint(4, 200, (3, 6))
    model = with_adapter(tiny_llama, True, torch.bfloat16).eval()
    engine = bf16_engine(model, True, cuda_graphs=True, capture=rerun_capture)
    generate(engine, ids)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    address = layer._rlhf_rollout_copies[torch.bfloat16]["default"][1].data_ptr()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)  # an optimizer step, in place
        with torch.autocast("cpu", dtype=torch.bfloat16):  # outside a generation: the live weights
            logits = model(input_ids=ids).logits
    updated = generate(engine, ids)
    assert layer._rlhf_rollout_copies[torch.bfloat16]["default"][1].data_ptr() == address  # graphs stay valid
    fresh = generate(bf16_engine(model, False, cuda_graphs=True, capture=rerun_capture), ids)  # same buckets
    assert torch.equal(updated.response_ids, fresh.response_ids)
    assert torch.equal(updated.logprobs, fresh.logprobs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, logits)
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.__dict__.pop("_rlhf_rollout_copies")  # gone: the same logits, so none were read
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_unmerge_restores_the_base_weight_in_place(tiny_llama):
    model = with_adapter(tiny_llama, True).eval()
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    weight = layer.base_layer.weight
    address, before = weight.data_ptr(), weight.detach().clone()
    model.merge_adapter()
    assert not torch.allclose(weight, before)
    model.unmerge_adapter()
    assert layer.base_layer.weight.data_ptr() == address  # a captured graph's weights stay where they were
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)


def test_copies_of_adapters_cast_to_the_rollout_dtype_since_are_dropped(tiny_llama):
    from rlhf.models.lora_forward import reading_rollout_copies, refresh_rollout_copies

    ids = torch.randint(4, 200, (2, 6))
    model = with_adapter(tiny_llama, True, torch.bfloat16).eval()
    assert refresh_rollout_copies(model, torch.bfloat16) == PROJECTIONS
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = (param.data * -2.0).bfloat16()  # new values, now in the rollout's dtype
    assert refresh_rollout_copies(model, torch.bfloat16) == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = model(input_ids=ids).logits
        with reading_rollout_copies(torch.bfloat16):
            assert torch.equal(model(input_ids=ids).logits, live)  # no old copy read


def test_under_fsdp_the_adapter_weights_are_used_through_their_modules(tiny_llama, tmp_path):
    """FSDP wraps (FSDP1) or swaps the class of (FSDP2) each trainable leaf, as PEFT's auto-wrap policy asks:
    a weight is only gathered when its module is called, so our forward calls lora_B there."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ids = torch.randint(4, 200, (2, 6))
        losses = []
        for fast in (False, True):
            model = with_adapter(tiny_llama, fast)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                    fully_shard(module)
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    finally:
        dist.destroy_process_group()


def test_a_users_choice_not_to_cast_the_input_is_kept(tiny_llama):
    from peft.helpers import disable_input_dtype_casting

    model = with_adapter(tiny_llama, False)
    with disable_input_dtype_casting(model):
        use_fast_lora_forward(model)
        assert all(m.cast_input_dtype_enabled is False for m in model.modules() if isinstance(m, LoraLinear))
    assert all(bool(m.cast_input_dtype_enabled) for m in model.modules() if isinstance(m, LoraLinear))


def test_the_rollout_copies_are_not_read_by_forwards_with_gradients(tiny_llama):
    from rlhf.models.lora_forward import reading_rollout_copies, refresh_rollout_copies

    model = with_adapter(tiny_llama, True, torch.bfloat16)
    refresh_rollout_copies(model, torch.bfloat16)
    ids = torch.randint(4, 200, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16), reading_rollout_copies(torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
