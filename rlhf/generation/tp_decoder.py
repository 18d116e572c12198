"""The engine's model side for the tensor-parallel :class:`rlhf.tp.model.Transformer`.

Every model-parallel rank runs the same steps on its shard: the column-/row-parallel projections and the
vocabulary-split LM head communicate inside the layers as in training, so the logits are the same on every
rank; the sampled tokens are then broadcast from rank 0 (:meth:`sync`) before their log-probs are read, so
the ranks never diverge whatever their random state. LoRA (:mod:`rlhf.tp.lora`) lives in forward hooks on
the projections, which apply when the engine calls them; the hooks are part of :meth:`state_key`.
"""

from __future__ import annotations

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from rlhf.generation.decoder import Decoder, LayerParts
from rlhf.tp.distributed import broadcast_from_main
from rlhf.tp.model import Transformer


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the engine cannot run this TP model (None when it can)."""
    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not a TP Transformer"
    if not model.has_lm_head:
        return "the TP model has a scalar head, not an LM head"
    return None


class TPDecoder(Decoder):
    """See the module docstring."""

    def __init__(self, model: Transformer) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.module = model
        args = model.args
        world_size = fs_init.get_model_parallel_world_size()
        self.capturable = args.n_experts == 0  # expert routing has data-dependent shapes
        self.layers = [
            LayerParts(
                attention_norm=block.attention_norm,
                q_proj=block.attention.wq,
                k_proj=block.attention.wk,
                v_proj=block.attention.wv,
                o_proj=block.attention.wo,
                mlp_norm=block.ffn_norm,
                mlp=block.feed_forward,
                n_heads=args.n_heads // world_size,
                n_kv_heads=args.n_kv_heads // world_size,
                head_dim=args.head_dim,
                window=block.window,
            )
            for block in model.layers
        ]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.tok_embeddings(tokens)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.module.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(h.dtype), emb.sin().to(h.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.module.logits(self.module.norm(h[:, None]))[:, 0]

    def state_key(self) -> tuple:
        modules = list(self.module.modules())
        hooks = tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
        # a LoRA hook multiplies by the float lora_scale, which a captured graph holds as a constant
        scales = tuple(m.lora_scale for m in modules if hasattr(m, "lora_scale"))
        return (self.module.training, hooks, scales)

    def sync(self, tokens: torch.Tensor) -> torch.Tensor:
        return broadcast_from_main(tokens)
