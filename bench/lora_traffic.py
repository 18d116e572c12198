"""What a LoRA adapter adds to a training step's forward + backward, counted on CPU: ops and bytes per decoder
layer, for PEFT's forward and for ours (:func:`rlhf.models.lora_forward.use_fast_lora_forward`, how every stage
builds its adapters: no float32 round trip of the input under autocast, the scaled output added by one
``addmm``), for ours with the input casts skipped only (the fused add removed again, to show each part), and
for ours under PPO's ``--torch_compile`` (the fused RMSNorm, the layer through inductor:
:mod:`rlhf.models.regional_compile`), where the bytes are inductor's own count of its compiled graphs.

``python bench/lora_traffic.py``: llamas of 1 and 2 layers of the TinyLlama-1.1B shape (hidden 2048,
intermediate 5632, 32 heads / 4 kv), a bf16 base, LoRA r=8 on all seven projections in float32 (PEFT's
default on a half-precision base), one forward and backward of the LM loss under CPU bf16 autocast on
``TOKENS`` tokens, only the adapter trainable (the frozen base still passes gradients to the activations). The
difference of the two depths is one layer. Per row: aten ops that do work (about one GPU kernel each), bytes
the matmul-like ops read and write (their inputs and outputs, weights included), bytes every other op reads
and writes (the memory-bound passes), and the CPU time of one layer. The ``no adapter`` row runs the same
backward to the activations without any adapter. Writes the ``lora-traffic-cpu`` section of bench/RESULTS.md.

Bytes scale with tokens: the table also gives the other ops' bytes at one PPO mini-batch of the GPU suite
(32 x 384 tokens) over 22 layers, and the time that takes at 3.35 TB/s (an H100's memory bandwidth), a
floor for the memory-bound passes, not a GPU timing.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import markdown_table, update_section  # noqa: E402

TOKENS = 2048
MINI_BATCH_TOKENS = 32 * 384
LAYERS_1B = 22
HBM_BYTES_PER_S = 3.35e12
MATMULS = ("aten.mm", "aten.bmm", "aten.addmm", "aten._scaled_dot_product", "aten.linear")
NO_WORK = ("aten.empty", "aten.detach", "aten.lift_fresh", "aten._unsafe_view", "aten._local_scalar")
VARIANTS = {  # name: (adapter, forward: "peft" / "casts" (input casts skipped only) / "ours", LoRA dropout)
    "no adapter": (False, "peft", 0.0),
    "PEFT, dropout 0": (True, "peft", 0.0),
    "input casts skipped only, dropout 0": (True, "casts", 0.0),
    "ours, dropout 0": (True, "ours", 0.0),
    "PEFT, dropout 0.05": (True, "peft", 0.05),
    "input casts skipped only, dropout 0.05": (True, "casts", 0.05),
    "ours, dropout 0.05": (True, "ours", 0.05),
    "ours + --torch_compile, dropout 0": (True, "compiled", 0.0),
    "ours + --torch_compile, dropout 0.05": (True, "compiled", 0.05),
}


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


class Traffic(TorchDispatchMode):
    """Ops that do work, and the bytes of their tensor inputs and outputs, matmul-like or not."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.matmul_bytes, self.other_bytes = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if func.is_view or name.startswith(NO_WORK):
            return out
        moved = _bytes(list(args)) + _bytes(list((kwargs or {}).values())) + _bytes(out)
        self.ops += 1
        if name.startswith(MATMULS):
            self.matmul_bytes += moved
        else:
            self.other_bytes += moved
        return out


def build(layers: int, adapter: bool, forward: str, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.lora_forward import use_fast_lora_forward

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=256, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    if not adapter:
        model.enable_input_require_grads()  # the backward to the activations a frozen base runs under LoRA
        return model.train()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout)
    model = get_peft_model(model, lora)  # float32 adapter weights on the bf16 base (PEFT's default)
    if forward != "peft":
        use_fast_lora_forward(model)
    if forward == "compiled":  # as PPO's --torch_compile builds it
        from rlhf.models.fused_rms_norm import use_fused_rms_norm
        from rlhf.models.regional_compile import compile_decoder_layers

        use_fused_rms_norm(model)
        compile_decoder_layers(model)
    if forward == "casts":  # PEFT's vanilla forward again, with the input casts still skipped
        for layer in model.modules():
            getattr(layer, "lora_variant", {}).clear()
    return model.train()


def measure(layers: int, variant: str) -> tuple[Traffic, float]:
    """One counted forward + backward, then the fastest of five timed ones. The compiled rows count
    inductor's own reads and writes of the compiled layer's forward and backward graphs (the first layer of
    a LoRA model runs eagerly, so the 2-layer model holds the one compiled layer and the 1-layer model none):
    the dispatcher does not see inside them."""
    model = build(layers, *VARIANTS[variant])
    ids = torch.randint(0, 256, (1, TOKENS))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    traffic = Traffic()
    if VARIANTS[variant][1] == "compiled":
        compiled_traffic(step, traffic)
    else:
        with traffic:
            step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return traffic, min(times)


def compiled_traffic(step, traffic: Traffic) -> None:
    """Run ``step`` (it compiles) and add inductor's count of its graphs to ``traffic``: each scheduled
    kernel's bytes read and written, extern kernels (matmuls, attention) apart from the fused ones."""
    import torch._inductor.metrics as metrics
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    torch.compiler.config.force_disable_caches = True  # a cache hit would skip the count
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts only with its metrics log on ...
    quiet = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    quiet.propagate = False  # ... which would print every count
    metrics.reset()
    try:
        step()
    finally:
        torch._logging.set_logs()
        quiet.propagate = True
    for node, words in metrics.nodes_num_elem:  # (node, bytes // 4)
        extern = isinstance(node, ExternKernelSchedulerNode)
        traffic.ops += 1
        if extern:
            traffic.matmul_bytes += 4 * words
        else:
            traffic.other_bytes += 4 * words


def reading(adapter_bytes: dict[str, int], cpu_ms: dict[str, float], other_mib: dict[str, float]) -> str:
    def cut(variant: str, dropout: str) -> str:
        return f"{1 - adapter_bytes[f'{variant}, dropout {dropout}'] / adapter_bytes[f'PEFT, dropout {dropout}']:.0%}"

    return (
        f"Against PEFT's forward, ours cuts the adapter's bytes by {cut('ours', '0')} with dropout 0 and by "
        f"{cut('ours', '0.05')} with dropout 0.05; skipping the input casts alone, by "
        f"{cut('input casts skipped only', '0')} and {cut('input casts skipped only', '0.05')}. Skipping the casts "
        "is bit-identical at dropout 0; the fused add rounds the sum once instead of three times "
        "(`tests/test_lora_forward.py`). What remains of the adapter's cost: the dropout's pass over each "
        "projection's input, the input gradient's add, and its thin matmuls, memory-bound at this size; the "
        "unmerged adapter's price in training. CPU time per layer (no adapter "
        f"{cpu_ms['no adapter']:,.0f} ms; PEFT / ours {cpu_ms['PEFT, dropout 0']:,.0f} / "
        f"{cpu_ms['ours, dropout 0']:,.0f} ms at dropout 0, {cpu_ms['PEFT, dropout 0.05']:,.0f} / "
        f"{cpu_ms['ours, dropout 0.05']:,.0f} ms at 0.05) is mostly the layer's matmuls on these two cores: the "
        "memory-bound passes barely show there, unlike on a GPU, which streams those bytes from its memory. "
        f"Compiled (PPO's --torch_compile), the other ops' bytes fall from {other_mib['ours, dropout 0.05']:,.0f} "
        f"to {other_mib['ours + --torch_compile, dropout 0.05']:,.0f} MiB per layer at dropout 0.05 (the "
        "matmuls' stay), inductor fusing the norms, RoPE, the SiLU gate, the dropout and the residual and "
        "adapter adds into few kernels; its CPU code is no faster here "
        f"({cpu_ms['ours + --torch_compile, dropout 0.05']:,.0f} ms), and on a GPU it is not yet measured.\n"
    )


def main() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows, baseline, adapter_bytes, cpu_ms, other_mib = [], None, {}, {}, {}
    for variant in VARIANTS:
        (one, t1), (two, t2) = measure(1, variant), measure(2, variant)
        ops = two.ops - one.ops
        matmul, other = two.matmul_bytes - one.matmul_bytes, two.other_bytes - one.other_bytes
        baseline = baseline if baseline is not None else matmul + other
        adapter_bytes[variant] = matmul + other - baseline
        cpu_ms[variant] = (t2 - t1) * 1e3
        compiled = (
            VARIANTS[variant][1] == "compiled"
        )  # fused with the layer: no adapter's share to tell apart
        other_mib[variant] = other / 2**20
        at_scale = (matmul + other) * MINI_BATCH_TOKENS / TOKENS * LAYERS_1B
        rows.append([
            variant, str(ops), f"{matmul / 2**20:,.0f}", f"{other / 2**20:,.0f}",
            "-" if compiled else f"{adapter_bytes[variant] / 2**20:,.0f}", f"{at_scale / 1e9:,.1f}",
            f"{at_scale / HBM_BYTES_PER_S * 1e3:,.0f}", f"{(t2 - t1) * 1e3:,.0f}",
        ])  # fmt: skip
        print(rows[-1], flush=True)
    table = markdown_table(
        ["variant", "ops / layer", "matmul MiB / layer", "other ops MiB / layer", "the adapter's MiB / layer",
         "GB / mini-batch (22 layers)", "ms at 3.35 TB/s", "CPU ms / layer"], rows,
    )  # fmt: skip
    text = (
        "## A LoRA adapter's cost in a training step, counted on CPU (`bench/lora_traffic.py`)\n\n"
        f"One decoder layer of the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 32 heads / 4 kv), bf16 "
        f"base, LoRA r=8 on all seven projections in float32 (PEFT's default on a half-precision base), forward "
        f"+ backward of the LM loss under CPU bf16 autocast on {TOKENS} tokens, only the adapter trainable "
        "(layer = 2-layer model minus 1-layer model). Ops: aten ops that do work (about one GPU kernel each). "
        "Bytes: the tensor inputs and outputs of each op, matmul-like ops (mm, bmm, addmm, attention) apart from "
        "the rest (the memory-bound passes); the adapter's: all bytes above the no-adapter row. The mini-batch "
        f"columns scale all bytes to one PPO mini-batch of the GPU suite ({MINI_BATCH_TOKENS:,} tokens, 22 "
        "layers) and divide by an H100's 3.35 TB/s: a floor for moving them, not a GPU timing. The --torch_compile "
        "rows (also our fused RMSNorm): inductor's count of the compiled layer's forward and backward graphs "
        "(CPU code generation; the GPU's Triton kernels come from the same fusion scheduler), each scheduled "
        "kernel's bytes read and written, extern kernels (matmuls, attention) as matmul-like; ops = kernels. "
        f"CPU ms: fastest of 5, {torch.get_num_threads()} threads, torch {torch.__version__}.\n\n{table}\n\n"
        + reading(adapter_bytes, cpu_ms, other_mib)
    )
    print(text)
    update_section("lora-traffic-cpu", text)


if __name__ == "__main__":
    main()
