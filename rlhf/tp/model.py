"""A tensor-parallel decoder written like the original llama ``model.py``, but trainable.

Parallelism shows only in the layer types (FairScale ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``ParallelEmbedding``) and in the local head counts. One class covers the families we serve:

- llama-1/2 (grouped-query attention when ``n_kv_heads < n_heads``), llama-3 RoPE scaling;
- mistral (``sliding_window``); mixtral (``n_experts`` > 0: a replicated router over sharded experts);
- qwen2 and the original Qwen (``qkv_bias``).

Unlike the original: no ``torch.inference_mode``, no global default dtype, and no KV cache here at all —
generation runs on the rollout engine's static cache (:mod:`rlhf.generation.tp_decoder`), which calls
this model's layers. Weights are not initialised
(``init_method`` is the identity, as in the original): a model is always filled from a checkpoint.

Shapes below: ``B`` batch, ``T`` new tokens, ``S`` keys (here the same T tokens), ``D`` model dim, ``H``/``Hkv`` local
query/key-value heads on this rank, ``hd`` head dim, ``V`` vocabulary, ``N`` model-parallel world size.
RoPE uses the Hugging Face (rotate-half) layout of ``wq``/``wk``, so shards convert from HF checkpoints
without permuting rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf.models.fused_rms_norm import fused_rms_norm
from rlhf.models.rope import apply_rope, signed_sin


@dataclass
class ModelArgs:
    """The architecture, as written to ``params.json`` next to the shards."""

    family: str = "llama"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: dim // n_heads
    vocab_size: int = 32000
    hidden_dim: int = 11008  # feed-forward width (per expert for mixtral)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_seq_len: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None  # None: every layer (when sliding_window is set)
    n_experts: int = 0  # > 0: mixture of experts
    n_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)  # family-specific notes kept for round trips

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def padded_vocab_size(self, world_size: int) -> int:
        """Rows of the vocabulary-split output layer: ``vocab_size`` rounded up to a multiple of N."""
        return math.ceil(self.vocab_size / world_size) * world_size

    def uses_sliding_window(self, layer_id: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_window_layers is None or layer_id in self.sliding_window_layers


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """FairScale ``init_method`` that leaves the (uninitialised) weight alone; a checkpoint fills it."""
    return tensor


def _local_linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised ``nn.Linear`` without bias (skips the default init: weights come from a checkpoint)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, as Hugging Face's ``LlamaRMSNorm``; one fused ``F.rms_norm`` where ``x`` and the
    weight share a dtype (:func:`rlhf.models.fused_rms_norm.fused_rms_norm`: one CUDA kernel each way)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return fused_rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (hd/2,) of RoPE, with linear or llama-3 scaling when the config asks for it."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        self.layer_id = layer_id
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = args.n_kv_heads // world_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wq = ColumnParallelLinear(
            args.dim, q_dim, bias=args.qkv_bias, gather_output=False, init_method=_keep
        )
        self.wk = ColumnParallelLinear(
            args.dim, kv_dim, bias=args.qkv_bias, gather_output=False, init_method=_keep
        )
        self.wv = ColumnParallelLinear(
            args.dim, kv_dim, bias=args.qkv_bias, gather_output=False, init_method=_keep
        )
        self.wo = RowParallelLinear(
            q_dim, args.dim, bias=args.o_bias, input_is_parallel=True, init_method=_keep
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, T, D), cos and sin_signed (B, 1, T, hd; :func:`rlhf.models.rope.signed_sin` of the sine), mask
        (B, 1, T, T) bool (True = attend) -> (B, T, D)."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (B, T, H, hd)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rope(xq.transpose(1, 2), cos, sin_signed)  # (B, H, T, hd)
        xk = apply_rope(xk.transpose(1, 2), cos, sin_signed).transpose(1, 2)  # (B, T, Hkv, hd)
        keys = xk.transpose(1, 2).repeat_interleave(self.n_rep, dim=1)  # (B, H, S, hd)
        values = xv.transpose(1, 2).repeat_interleave(self.n_rep, dim=1)
        output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask)  # (B, H, T, hd)
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, H * hd)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1/w3 split on the output, w2 on the input."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertShard(nn.Module):
    """This rank's slice of one expert: w1/w3 rows and w2 columns (hidden_dim / N of each)."""

    def __init__(self, dim: int, local_hidden: int):
        super().__init__()
        self.w1 = _local_linear(dim, local_hidden)
        self.w2 = _local_linear(local_hidden, dim)
        self.w3 = _local_linear(dim, local_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, D) -> this rank's partial sum (n, D) of the expert's output."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeFeedForward(nn.Module):
    """Mixtral's sparse block: softmax router (replicated), top-k experts renormalised, experts sharded.

    Each rank computes its partial output of every routed (token, slot); one all-reduce sums the partials
    before the routing weights apply, so router gradients are the same on every rank.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        local_hidden = args.hidden_dim // fs_init.get_model_parallel_world_size()
        self.top_k = args.n_experts_per_tok
        self.gate = _local_linear(args.dim, args.n_experts)
        self.experts = nn.ModuleList(ExpertShard(args.dim, local_hidden) for _ in range(args.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        x = x.reshape(-1, dim)  # (n, D), n = B * T
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (n, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (n, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        x_parallel = copy_to_model_parallel_region(x)
        # the (token, slot) pairs grouped by expert, in (token, slot) order within each: one host sync per
        # layer for the group sizes, not one per expert (which stalled every decode step on a GPU)
        flat = chosen.reshape(-1)  # (n * k,) the expert of each pair
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        routed = x_parallel[order // self.top_k]  # (n * k, D), the pairs' tokens, grouped
        outputs = torch.cat(
            [expert(part) for expert, part in zip(self.experts, routed.split(counts)) if len(part)]
        )
        # back in (token, slot) order
        partial = outputs.new_empty(outputs.shape).index_copy(0, order, outputs)
        out = reduce_from_model_parallel_region(partial.view(-1, self.top_k, dim))  # (n, k, D), over ranks
        return (out * weights.unsqueeze(-1)).sum(dim=1).view(bsz, seqlen, dim)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        if args.n_experts > 0:
            self.feed_forward = MoeFeedForward(args)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.window = args.sliding_window if args.uses_sliding_window(layer_id) else None

    def forward(self, x, cos, sin_signed, masks):
        mask = masks[self.window]
        h = x + self.attention(self.attention_norm(x), cos, sin_signed, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_masks(
    key_mask: torch.Tensor, n_new: int, windows: set[int | None]
) -> dict[int | None, torch.Tensor]:
    """Boolean masks (B, 1, T, S) per sliding window (None = full causal attention).

    ``key_mask`` (B, S) marks real tokens among all keys (cache + new); the last ``n_new`` keys are the
    queries. A query sees real keys at or before it (and within the window, counted in positions); every
    query also sees itself, so rows of left padding stay finite (their outputs are never used).
    """
    seq = key_mask.shape[1]
    q_idx = torch.arange(seq - n_new, seq, device=key_mask.device)
    k_idx = torch.arange(seq, device=key_mask.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (T, S)
    allowed = causal[None] & key_mask[:, None, :].bool()  # (B, T, S)
    positions = key_mask.long().cumsum(-1)  # (B, S)
    masks = {}
    for window in windows:
        mask = allowed
        if window is not None:
            distance = positions[:, -n_new:, None] - positions[:, None, :]  # (B, T, S)
            mask = mask & (distance < window)
        masks[window] = (mask | (k_idx[None, None, :] == q_idx[None, :, None])).unsqueeze(1)
    return masks


class Transformer(nn.Module):
    """Decoder with an LM head (``output``, split over the vocabulary) or none (``lm_head=False``)."""

    def __init__(self, args: ModelArgs, lm_head: bool = True):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        self.args = args
        self.vocab_size = args.vocab_size
        padded_vocab = args.padded_vocab_size(world_size)
        if args.tie_word_embeddings:  # split over the vocabulary so the output layer can share the shard
            self.tok_embeddings = VocabParallelEmbedding(padded_vocab, args.dim, init_method=_keep)
        else:  # split over the model dimension, as the original llama model does
            self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = None
        if lm_head and not args.tie_word_embeddings:
            self.output = ColumnParallelLinear(args.dim, padded_vocab, bias=False, init_method=_keep)
        self.has_lm_head = lm_head
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.windows = {layer.window for layer in self.layers}
        self.gradient_checkpointing = False  # recompute each block in the backward (training forwards only)

    def hidden_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, D).

        ``attention_mask`` (B, T) marks real tokens (1) and padding (0); positions count real tokens only, so
        left padding does not shift RoPE.
        """
        bsz, seqlen = tokens.shape
        if attention_mask is None:
            attention_mask = torch.ones(bsz, seqlen, dtype=torch.long, device=tokens.device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seqlen:]  # (B, T)
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :].float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        cos, sin_signed = emb.cos().to(h.dtype), signed_sin(emb.sin().to(h.dtype))  # RoPE: 3 kernels per use
        masks = attention_masks(attention_mask, seqlen, self.windows)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keep each block's input only; the backward recomputes the rest
                h = checkpoint(layer, h, cos, sin_signed, masks, use_reentrant=False)
            else:
                h = layer(h, cos, sin_signed, masks)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D) -> logits (B, T, V) (padding rows of the vocabulary dropped)."""
        if self.output is not None:
            out = self.output(h)
        else:
            out = gather_from_model_parallel_region(
                F.linear(copy_to_model_parallel_region(h), self.tok_embeddings.weight)
            )
        return out[..., : self.vocab_size]

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), the same on every rank."""
        return self.logits(self.hidden_states(tokens, attention_mask))


class ScalarHeadTransformer(Transformer):
    """The decoder with a replicated scalar head (``v_head``) instead of the LM head: verifier and critic.

    ``forward`` returns one score per token (B, T); read it at the last real token for a sequence score.
    """

    def __init__(self, args: ModelArgs):
        super().__init__(args, lm_head=False)
        self.v_head = _local_linear(args.dim, 1)
        nn.init.zeros_(self.v_head.weight)

    def forward(self, tokens, attention_mask=None) -> torch.Tensor:
        h = self.hidden_states(tokens, attention_mask)
        return self.v_head(h.to(self.v_head.weight.dtype)).squeeze(-1)
