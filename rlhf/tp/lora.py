"""LoRA on tensor-parallel layers: ``W x + (alpha / r) * B A x`` with A and B split to match the layer.

- column-parallel layer (``wq``, ``wk``, ``wv``, ``w1``, ``w3``; W split on its output): A (r, in) is
  replicated, B (out / N, r) is split on the output like W;
- row-parallel layer (``wo``, ``w2``; W split on its input): A (r, in / N) is split on the input like W,
  B (out, r) is replicated.

The low-rank path communicates like the layer it sits on: for a column layer the gradient of A x is
all-reduced (so the replicated A gets the same, full gradient on every rank); for a row layer A x is
all-reduced in the forward pass (so the replicated B sees the full product). Both merge as
``W_local += (alpha / r) * B_local @ A_local``.

A is initialised as peft does (uniform in +-1/sqrt(fan_in), fan_in of the full layer) from a generator
seeded per layer, drawn at full size and then sliced, so the adapter is the same at any world size;
B starts at zero. Building them draws nothing from the default RNG, whose state the dropout masks after it
depend on. The LoRA weights live on the layer as ``lora_A.weight`` / ``lora_B.weight`` and a forward
hook adds their output, so the layer's own keys (``layers.0.attention.wq.weight``) do not change.
Dropout on the replicated input of a column layer draws from the default RNG: seed every rank the same.
On a row layer's split input each rank draws the mask of the full input and keeps its slice
(:class:`ShardDropout`), so the slices' masks are independent, as in one process.
"""

from __future__ import annotations

import logging
import math

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from torch import nn

from rlhf.errors import ConfigError
from rlhf.models.lora import LoraSpec

logger = logging.getLogger(__name__)

# Hugging Face projection names (what --lora_target takes elsewhere) -> the TP model's layer names
HF_TARGETS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
}
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ALL_TARGETS = "all"  # --lora_target: every projection above


def resolve_targets(targets: list[str] | tuple[str, ...]) -> set[str]:
    """Layer names from ours (``wq``) or Hugging Face's (``q_proj``); ``all`` means every projection."""
    if list(targets) in ([ALL_TARGETS], ["all-linear"]):
        return set(DEFAULT_TARGETS)
    names = {HF_TARGETS.get(t, t) for t in targets}
    unknown = sorted(names - set(DEFAULT_TARGETS))
    if unknown:
        accepted = ", ".join(list(DEFAULT_TARGETS) + list(HF_TARGETS))
        raise ConfigError(
            f"--lora_target {', '.join(unknown)} is not a TP projection (accepted: {accepted}, all)"
        )
    return names


class ShardDropout(nn.Module):
    """Dropout on this rank's slice (the last dimension, split in ``world_size`` equal parts) of an input
    that a row-parallel layer holds split over the model-parallel ranks.

    ``nn.Dropout`` there would draw the same mask on every rank (their RNGs are seeded alike), so slice 0
    and slice 1 would drop the same columns: correlated noise that a single process never has, and results
    that change with the TP degree. Here each rank draws the mask of the full width, as one process would,
    and keeps its own slice; the ranks' RNGs stay in step.
    """

    def __init__(self, p: float, world_size: int, rank: int) -> None:
        super().__init__()
        self.p, self.world_size, self.rank = p, world_size, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        full = x.new_empty(*x.shape[:-1], x.shape[-1] * self.world_size).bernoulli_(1 - self.p)
        return x * full.div_(1 - self.p).chunk(self.world_size, dim=-1)[self.rank]  # F.dropout's arithmetic

    def extra_repr(self) -> str:
        return f"p={self.p}, slice {self.rank} of {self.world_size}"


def _lora_delta(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the layer's output plus its low-rank update (computed in the adapter's float32, added in
    the output's dtype)."""
    x = layer.lora_dropout(inputs[0].to(layer.lora_A.weight.dtype))
    if isinstance(layer, ColumnParallelLinear):
        h = copy_to_model_parallel_region(layer.lora_A(x))  # (.., r), the same on every rank
        delta = layer.lora_B(h)  # (.., out / N)
        if layer.gather_output:
            delta = gather_from_model_parallel_region(delta)
    else:
        if not layer.input_is_parallel:
            x = scatter_to_model_parallel_region(x)
        h = reduce_from_model_parallel_region(layer.lora_A(x))  # (.., r), summed over the input shards
        delta = layer.lora_B(h)  # (.., out)
    return output + (delta * layer.lora_scale).to(output.dtype)


def _uninitialised_linear(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight is left uninitialised: nothing drawn from the default RNG."""
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False, device=device, dtype=dtype)


def _add_lora(layer: nn.Module, r: int, alpha: float, dropout: float, seed: int) -> None:
    world_size = fs_init.get_model_parallel_world_size()
    rank = fs_init.get_model_parallel_rank()
    column = isinstance(layer, ColumnParallelLinear)
    in_local = layer.in_features if column else layer.input_size_per_partition
    out_local = layer.output_size_per_partition if column else layer.out_features
    weight = layer.weight
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(layer.in_features)
    full_a = torch.empty(r, layer.in_features).uniform_(-bound, bound, generator=generator)
    a = full_a if column else full_a.chunk(world_size, dim=1)[rank]
    # float32 even on a bf16/fp16 base (as PEFT does): AdamW's steps of about lr are far below one bf16 step
    # of a weight, so a half-precision adapter would barely move
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    # skip_init: an nn.Linear's default init would draw as many numbers from the default RNG as this rank's
    # shard has, so the dropout masks drawn after it would change with the TP degree; A and B are set below
    layer.lora_A = _uninitialised_linear(in_local, r, weight.device, dtype)
    layer.lora_B = _uninitialised_linear(r, out_local, weight.device, dtype)
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.zero_()
    if dropout <= 0:
        layer.lora_dropout = nn.Identity()
    elif not column and layer.input_is_parallel and world_size > 1:  # this rank's slice of the input
        layer.lora_dropout = ShardDropout(dropout, world_size, rank)
    else:
        layer.lora_dropout = nn.Dropout(dropout)
    layer.lora_alpha = float(alpha)  # what a resumed run must share (``TPPolicyModels.adapter_settings``)
    layer.lora_scale = alpha / r
    layer.lora_handle = layer.register_forward_hook(_lora_delta)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers carrying LoRA weights, by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_handle")}


def apply_lora(
    model: nn.Module,
    spec: LoraSpec | None = None,
    *,
    seed: int = 0,
    r: int | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
) -> list[str]:
    """Freeze the model and add trainable LoRA weights to the layers ``spec.targets`` names; returns their
    names. ``spec`` (rank, alpha, dropout, targets) is the adapter every stage describes with
    :class:`rlhf.models.lora.LoraSpec`; the keywords ``r``/``alpha``/``dropout``/``targets`` build one for
    callers that have no spec."""
    if spec is None:
        if r is None or alpha is None:
            raise TypeError("apply_lora needs a LoraSpec, or r= and alpha=")
        spec = LoraSpec(rank=r, alpha=alpha, dropout=dropout, targets=list(targets))
    if not spec.use_lora:
        raise ConfigError(f"--lora_rank must be > 0 for LoRA, got {spec.rank}")
    wanted = resolve_targets(spec.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    names = []
    for index, (name, module) in enumerate(model.named_modules()):
        if name.rsplit(".", 1)[-1] in wanted and isinstance(
            module, (ColumnParallelLinear, RowParallelLinear)
        ):
            _add_lora(module, spec.rank, spec.alpha, spec.dropout, seed * 100003 + index)
            names.append(name)
    if not names:
        raise ConfigError(f"--lora_target {', '.join(spec.targets)} matched no layer of the model")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "LoRA r=%d alpha=%g on %d layers: %d trainable parameters on this rank",
        spec.rank,
        spec.alpha,
        len(names),
        trainable,
    )
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's LoRA weights (``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``), detached copies."""
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k
    }


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight and remove it; the model computes the same. Returns the count."""
    layers = lora_layers(model)
    for layer in layers.values():
        delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.lora_scale
        layer.weight.add_(delta.to(layer.weight.dtype))
        layer.lora_handle.remove()
        for attr in ("lora_A", "lora_B", "lora_dropout", "lora_alpha", "lora_scale", "lora_handle"):
            delattr(layer, attr)
    return len(layers)
