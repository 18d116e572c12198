"""``--torch_compile`` for PPO (:mod:`rlhf.models.regional_compile`): the decoder layers through one compiled
forward give the eager values and gradients, one graph serves every layer and every length, a KV-cache
forward (``generate``) stays eager, and the tensor-parallel backend refuses the flag by name."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.errors import ConfigError
from rlhf.models.fused_rms_norm import use_fused_rms_norm
from rlhf.models.lora_forward import use_fast_lora_forward
from rlhf.models.regional_compile import compile_decoder_layers, decoder_layers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is and counts the graphs."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs += 1
        return gm.forward


def lora_llama(layers: int = 3, dropout: float = 0.0) -> torch.nn.Module:
    """A random llama (head_dim 16) with ``actor`` and ``critic`` adapters, built as the PPO stage builds its
    base (our LoRA forward, fused RMSNorm)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora, adapter_name="actor")
    model.add_adapter("critic", lora)
    use_fast_lora_forward(model)
    use_fused_rms_norm(model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def forward_backward(model, ids, mask, adapter: str, grad: bool):
    """Logits and the adapter gradients of one forward (+ backward with ``grad``)."""
    model.base_model.set_adapter(adapter)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        param.grad = None
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if grad:
            logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_compiled_layers_give_the_eager_values_and_gradients():
    """Inductor (the flag's default backend), float32: logits of a no-grad forward and the adapters'
    gradients of a training forward equal eager ones, for two adapters and a left-padded batch."""
    ids = torch.randint(0, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eager, compiled = lora_llama(), lora_llama()
    assert compile_decoder_layers(compiled) == 3
    for adapter, grad in [("actor", True), ("critic", False)]:
        logits, grads = forward_backward(eager, ids, mask, adapter, grad)
        logits_c, grads_c = forward_backward(compiled, ids, mask, adapter, grad)
        torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads.keys() and (len(grads) > 0) == grad
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6)


def test_one_graph_serves_every_layer_and_every_length():
    """The layers share one compiled function whose graphs take the weights as inputs: one graph for all
    three layers and three sequence lengths; another adapter is one more graph, not one per layer."""
    counter = CountingBackend()
    model = lora_llama().eval()
    compile_decoder_layers(model, backend=counter)
    with torch.no_grad():
        for length in (9, 11, 13):
            model(input_ids=torch.randint(0, 128, (2, length)), use_cache=False)
        assert counter.graphs == 1
        model.base_model.set_adapter("critic")
        model(input_ids=torch.randint(0, 128, (3, 7)), use_cache=False)
    assert counter.graphs == 2


def test_with_gradient_checkpointing_a_forward_without_gradients_is_one_graph():
    """Checkpointing's input hook marks the embedding's output as needing a gradient even under no_grad: the
    first layer still shares the others' graph (its input is detached there), one graph for the rollout."""
    counter = CountingBackend()
    model = lora_llama().eval()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.enable_input_require_grads()
    compile_decoder_layers(model, backend=counter)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 9)), use_cache=False)
    assert counter.graphs == 1


def test_first_lora_layer_of_an_update_runs_eagerly():
    """With gradients on, the first layer's input (the frozen embedding's output) needs none: that layer
    runs eagerly rather than compiling a graph of its own; the others share one graph."""
    counter = CountingBackend()
    model = lora_llama()
    compile_decoder_layers(model, backend=counter)
    calls = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append(args[0].requires_grad), with_kwargs=True
        )
    forward_backward(model, torch.randint(0, 128, (2, 9)), None, "actor", grad=True)
    assert calls == [False, True, True] and counter.graphs == 1


def test_generate_with_a_kv_cache_runs_the_layers_eagerly():
    """Hugging Face ``generate`` (``--generation_engine hf``) passes a KV cache: the layers run their eager
    forward (the cache's Python state would make a graph per layer) and decode the same tokens."""
    counter = CountingBackend()
    eager, compiled = lora_llama().eval(), lora_llama().eval()
    compile_decoder_layers(compiled, backend=counter)
    ids = torch.randint(0, 128, (2, 5))
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = eager.generate(input_ids=ids, **options)
    assert torch.equal(compiled.generate(input_ids=ids, **options), expected)
    assert counter.graphs == 0


def test_a_training_forward_with_a_kv_cache_runs_eagerly_and_says_so(caplog):
    """A training forward that leaves ``use_cache`` on (the config's default) passes a cache to the layers:
    they run eagerly, and one warning names the fix (PPO's forwards pass use_cache=False)."""
    from rlhf.models import regional_compile

    regional_compile._warn_cache_once.cache_clear()
    counter = CountingBackend()
    model = lora_llama()
    compile_decoder_layers(model, backend=counter)
    ids = torch.randint(0, 128, (2, 9))
    with caplog.at_level("WARNING", logger="rlhf.models.regional_compile"):
        model(input_ids=ids).logits.sum().backward()
        model(input_ids=ids).logits.sum().backward()
    assert counter.graphs == 0
    warned = [
        r for r in caplog.records if "with a KV cache runs the layers eagerly (use_cache=False)" in r.message
    ]
    assert len(warned) == 1  # once per process
    model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert counter.graphs == 1


def test_a_model_without_decoder_layers_is_named():
    with pytest.raises(ConfigError, match="--torch_compile: Linear has no decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def test_a_misspelt_backend_is_refused_before_any_model_loads():
    from rlhf.ppo.config import check_compile_backend

    check_compile_backend("inductor")
    with pytest.raises(ConfigError, match="^--torch_compile_backend indcutor: expected one of .*inductor"):
        check_compile_backend("indcutor")


def test_the_tensor_parallel_backend_refuses_the_flag(tmp_path):
    from rlhf.ppo.config import PPOArguments
    from rlhf.tp.ppo_train import TPPPOArguments, TPPPOTrainingArguments, apply_description_flags

    tp = TPPPOArguments(
        actor_ckpt_dir="a", actor_save_dir=str(tmp_path / "b"), train_file="c", reward_fn="gsm8k"
    )
    for flags in ({"torch_compile": True}, {"torch_compile_backend": "aot_eager"}):
        with pytest.raises(
            ConfigError, match="^--torch_compile: compiles the decoder layers of a Hugging Face"
        ):
            apply_description_flags(tp, PPOArguments(), TPPPOTrainingArguments(**flags))
