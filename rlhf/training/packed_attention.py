"""Attention over packed documents without a dense mask, as a transformers attention implementation.

A packed batch is one row of ``T`` tokens holding several documents whose ``position_ids`` restart at 0;
``cu_seqlens`` (D+1,) holds the document boundaries ``[0, n_1, n_1 + n_2, ..., T]``. transformers' SDPA
path turns restarting positions into a dense ``(T, T)`` block-diagonal mask, which rules out SDPA's fast
kernels and costs more than the padding it saves. :func:`use_packed_attention` instead registers
``rlhf_packed_<backend>`` in transformers' ``AttentionInterface`` and sets it on the model; its mask
function only passes the 2D padding mask through, so transformers builds no dense mask, and every attention
layer gets ``cu_seqlens`` (from the collator's ``cu_seq_lens_q``/``max_length_q``, or derived from
``position_ids``) and runs causal attention inside each document only. Backends:

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention kernels; CUDA only,
  torch >= 2.10; the causal argument changed name between releases and is looked up at run time);
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the ``flash-attn`` package is installed;
- ``flex``: FlexAttention with a document mask (a ``BlockMask``, built once per forward); CUDA for
  training (PyTorch has no FlexAttention backward on CPU);
- ``sdpa``: one causal SDPA call per document: exact, runs anywhere, and is the CPU path (tests).

``auto`` takes the first available of varlen, flash_attn, flex on a GPU (the first two in half precision
only: their kernels take float16/bfloat16) and ``sdpa`` on CPU; the choice is logged. Batches that are
not packed (several rows, or one document) and padded batches with an ``attention_mask`` go through
ordinary SDPA with a causal (and padding / sliding-window) mask.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "varlen", "flash_attn", "flex", "sdpa")
FLAG_HELP = (
    "Attention over packed sequences (--packing): auto (GPU: varlen, flash_attn (these two in bf16/fp16 "
    "only) or flex; CPU: sdpa), "
    "varlen (torch varlen_attn), flash_attn, flex (FlexAttention), sdpa (one call per sequence)."
)
PREFIX = "rlhf_packed_"
HALF = (torch.float16, torch.bfloat16)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries (D+1,) int32 of a packed row: a document starts wherever the position is 0.

    ``position_ids``: (1, T) or (T,), restarting at 0 for every document. Returns ``[0, ..., T]``.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) index of the document each token belongs to, from boundaries ``cu_seqlens`` (D+1,)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def causal_mask(
    length: int,
    device: torch.device,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, T), True = attend: causal, within ``window`` tokens back, real keys only.

    ``key_mask``: optional (B, T) padding mask (1 = real token). A query row left with no key (a left pad)
    may attend to every key so SDPA returns no NaN; such positions are padding and carry no loss.
    """
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    mask = mask[None, None]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Repeat each key/value head ``n_rep`` times along ``dim`` (head j reads kv head j // n_rep)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


# --- the backends: (q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (D+1,), max_len, scale, window) -> (T, Hq, D)


def sdpa_per_document(q, k, v, cu_seqlens, max_len, scale, window):
    """One causal SDPA call per document (exact isolation; any device, any dtype)."""
    n_rep = q.shape[1] // k.shape[1]
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # (1, H, n, D)
        kd, vd = _repeat_kv(kd, n_rep, 1), _repeat_kv(vd, n_rep, 1)
        n = end - start
        if window is not None and n > window:
            mask = causal_mask(n, q.device, window)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out, dim=0)


@functools.cache
def _varlen_api() -> tuple[Callable, dict, frozenset] | None:
    """(varlen_attn, its causal keyword arguments, its keyword names), or None when torch has none.

    torch 2.10 takes ``is_causal``; later releases take ``window_size=(-1, 0)``; ``scale`` and
    ``enable_gqa`` are not in every release.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = frozenset(inspect.signature(varlen_attn).parameters)
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, params


def torch_varlen(q, k, v, cu_seqlens, max_len, scale, window):
    """``torch.nn.attention.varlen.varlen_attn``, causal inside each document."""
    varlen_attn, causal, params = _varlen_api()
    kwargs = dict(causal)
    if scale is not None and "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise ConfigError("--packed_attention varlen: this torch's varlen_attn has no scale argument")
    if window is not None and window < max_len:
        if "window_size" not in params:
            raise ConfigError("--packed_attention varlen: this torch has no sliding-window varlen attention")
        kwargs["window_size"] = (window - 1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    else:
        n_rep = q.shape[1] // k.shape[1]
        k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def flash_attn_varlen(q, k, v, cu_seqlens, max_len, scale, window):
    """``flash_attn.flash_attn_varlen_func`` (FlashAttention-2), causal inside each document."""
    from flash_attn import flash_attn_varlen_func

    window_size = (window - 1, 0) if window is not None and window < max_len else (-1, -1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
        softmax_scale=scale, causal=True, window_size=window_size,
    )  # fmt: skip


class _BlockMaskCache:
    """The document ``BlockMask`` of the current forward: every layer gets the same ``cu_seqlens`` tensor.

    The cache holds that tensor itself, so an identity match can never be a different, later tensor.
    """

    cu_seqlens: torch.Tensor | None = None
    window: int | None = None
    mask = None


def _document_block_mask(cu_seqlens: torch.Tensor, total: int, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    if _BlockMaskCache.cu_seqlens is not cu_seqlens or _BlockMaskCache.window != window:
        doc = document_ids(cu_seqlens, total)

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
            return keep if window is None else keep & (kv_idx > q_idx - window)

        # compiled on CUDA: built eagerly, the mask materialises (T, T) booleans and gathers (several GB for a
        # 32k-token packed row); compiled, it is evaluated block by block
        compiled = {"_compile": True} if cu_seqlens.device.type == "cuda" else {}
        _BlockMaskCache.mask = create_block_mask(
            mask_mod, None, None, total, total, device=cu_seqlens.device, **compiled
        )
        _BlockMaskCache.cu_seqlens, _BlockMaskCache.window = cu_seqlens, window
    return _BlockMaskCache.mask


@functools.cache
def _flex_function(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def flex_document(q, k, v, cu_seqlens, max_len, scale, window):
    """FlexAttention with a document-causal ``BlockMask`` (compiled on CUDA)."""
    total = q.shape[0]
    block_mask = _document_block_mask(cu_seqlens, total, window)
    flex = _flex_function(q.device.type)
    out = flex(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out[0].transpose(0, 1)


KERNELS: dict[str, Callable] = {
    "varlen": torch_varlen,
    "flash_attn": flash_attn_varlen,
    "flex": flex_document,
    "sdpa": sdpa_per_document,
}
NEEDS_HALF = ("varlen", "flash_attn")  # FlashAttention kernels take float16/bfloat16 only


def backend_available(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can train on ``device_type`` (``"cuda"`` or ``"cpu"``) here."""
    if name == "sdpa":
        return True
    if device_type != "cuda":
        return False
    if name == "varlen":
        return _varlen_api() is not None
    if name == "flash_attn":
        return importlib.util.find_spec("flash_attn") is not None
    if name == "flex":
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return False


def choose_backend(requested: str, device_type: str, half_precision: bool = True) -> str:
    """The backend to use: ``requested``, or for ``auto`` the first available of varlen, flash_attn, flex, sdpa.

    ``half_precision``: whether the attention inputs will be float16/bfloat16 (``--bf16``/``--fp16`` or a
    half-precision model); without it ``auto`` skips the FlashAttention kernels, which cannot run float32,
    and naming one of them is a one-line error."""
    if requested not in BACKENDS:
        raise ConfigError(f"--packed_attention must be one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "auto":
        order = ("varlen", "flash_attn", "flex", "sdpa") if device_type == "cuda" else ("sdpa",)
        order = tuple(n for n in order if half_precision or n not in NEEDS_HALF)
        return next(name for name in order if backend_available(name, device_type))
    if not backend_available(requested, device_type):
        raise ConfigError(
            f"--packed_attention {requested} is not available on {device_type} here "
            f"(available: {', '.join(n for n in KERNELS if backend_available(n, device_type))})"
        )
    if requested in NEEDS_HALF and not half_precision:
        raise ConfigError(
            f"--packed_attention {requested} runs float16/bfloat16 only: add --bf16 or --fp16, or choose "
            "flex or sdpa for a float32 run"
        )
    return requested


# --- the transformers attention function


def _dense_attention(query, key, value, attention_mask, dropout, scaling, window):
    """Ordinary SDPA for batches that are not packed. query (B, Hq, T, D), key/value (B, Hkv, T, D)."""
    length = query.shape[2]
    if key.shape[2] != length:
        raise ConfigError(
            "packed attention is for training forwards; generate with the model's default attention"
        )
    key_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep, 1), _repeat_kv(value, n_rep, 1)
    if key_mask is None and (window is None or window >= length):
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=length > 1, scale=scaling
        )
    else:
        mask = causal_mask(length, query.device, window, key_mask)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    return out.transpose(1, 2).contiguous()


def padding_mask_only(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function registered with the packed attention: hand the (B, T) padding mask through.

    transformers calls it instead of building a 4D mask; a packed row has no ``attention_mask``, so no
    mask is built at all, and a padded batch keeps its padding mask for :func:`_dense_attention`.
    """
    return attention_mask


def _packed_boundaries(kwargs: dict) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_len) of a packed row from the collator's kwargs or its position_ids; None if one document."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return cu.to(torch.int32), int(max_len)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    cu = cu_seqlens_from_position_ids(position_ids)
    if cu.numel() <= 2:
        return None
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    backend: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query (B, Hq, T, D), key/value (B, Hkv, T, D) -> (B, T, Hq, D).

    A packed row (B = 1 with the collator's ``cu_seq_lens_q``, or without ``attention_mask`` and with
    restarting ``position_ids``) runs ``KERNELS[backend]`` over its documents; anything else (a padded
    batch, one document) runs :func:`_dense_attention`.
    """
    window = kwargs.get("sliding_window")
    packed = None
    if query.shape[0] == 1 and (attention_mask is None or "cu_seq_lens_q" in kwargs):
        packed = _packed_boundaries(kwargs)
    if packed is None:
        return _dense_attention(query, key, value, attention_mask, dropout, scaling, window), None
    if dropout:
        raise ConfigError("packed attention does not implement attention dropout; set attention_dropout 0")
    cu_seqlens, max_len = packed
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if torch.is_autocast_enabled(q.device.type):
        # fp32 master weights under --bf16/--fp16: RoPE returned float32 q/k next to a half-precision v;
        # every backend gets one dtype, autocast's (as SDPA would cast them under autocast)
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    elif backend in NEEDS_HALF and q.dtype not in HALF:
        backend = "sdpa"  # float32 without autocast: FlashAttention kernels cannot run it
    out = KERNELS[backend](
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len, scaling, window
    )
    return out[None], None


def use_packed_attention(
    model: torch.nn.Module, requested: str = "auto", mixed_precision: bool = False
) -> str:
    """Register the packed attention function for the chosen backend and set it on ``model``; return its name.

    Call on the transformers model (before or after wrapping it in PEFT). ``mixed_precision``: the run
    trains under ``--bf16``/``--fp16`` autocast (a float16/bfloat16 model counts without it). The name is
    not saved in ``config.json``; saved models load with their default attention.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    half = mixed_precision or any(p.dtype in HALF for p in target.parameters() if p.is_floating_point())
    backend = choose_backend(requested, device_type, half)
    dropout = getattr(target.config, "attention_dropout", 0.0)
    if dropout:
        raise ConfigError(f"--packing: attention_dropout {dropout} is not implemented by packed attention")
    name = PREFIX + backend
    AttentionInterface.register(name, functools.partial(packed_attention_forward, backend=backend))
    AttentionMaskInterface.register(name, padding_mask_only)
    target.set_attn_implementation(name)
    precision = "bf16/fp16" if half else "float32"
    logger.info(
        "packed attention: %s (--packed_attention %s, %s, %s)", backend, requested, device_type, precision
    )
    return name


def is_packed_attention(attn_implementation: str | None) -> bool:
    """Whether the model's attention implementation is one registered by :func:`use_packed_attention`."""
    return bool(attn_implementation) and attn_implementation.startswith(PREFIX)
