"""The PPO loop's backend and generation seams on the tensor-parallel model.

:class:`TPBackend` implements :class:`rlhf.backend.Backend` for a job whose ``torchrun`` processes are
the model-parallel ranks of **one** model replica: every process runs the same loop on the same data
(same seed, same prompts, same shuffles) and holds its slice of each weight. Hence

- ``world_size`` is 1 (one data-parallel replica: sample counts are not multiplied by the TP degree),
  ``rank`` is the model-parallel rank (it names the per-process checkpoint dir ``rank_K/``), and
  ``is_main`` is rank 0;
- ``per_process_weights`` is true: each process checkpoints its own trainable slice and optimizer state,
  and the exports are collective (:mod:`rlhf.ppo.checkpoint`);
- ``mean``/``gather`` are identities (every rank already holds the same values); ``step`` clips each
  model's gradients by their norm over the whole model (:func:`rlhf.tp.distributed.clip_grad_norm`).

:class:`TPGenerator` implements :class:`rlhf.generation.Generator` with :func:`rlhf.tp.generation.generate`
(KV cache; sampled tokens broadcast from rank 0, so the ranks never diverge).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from rlhf.errors import ConfigError
from rlhf.generation import Generation, SamplingConfig
from rlhf.tp.distributed import barrier, clip_grad_norm, device
from rlhf.tp.generation import generate
from rlhf.tp.model import Transformer

logger = logging.getLogger(__name__)


class TPBackend:
    """See the module docstring. ``modules`` maps each optimizer's name to the model it trains."""

    per_process_weights = True
    world_size = 1

    def __init__(self, rank: int, modules: dict[str, torch.nn.Module] | None = None) -> None:
        self.rank = rank
        self.device = device()
        self.modules = dict(modules or {})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def autocast(self):
        return nullcontext()  # the TP models hold their dtype (--dtype) themselves

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        parameter_groups: dict[str, list[torch.nn.Parameter]],
        max_grad_norm: float,
    ) -> dict[str, float]:
        norms = {}
        for name, optimizer in optimizers.items():
            norms[name] = clip_grad_norm(self.modules[name], max_grad_norm if max_grad_norm > 0 else None)
            optimizer.step()
            schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
        return norms

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        barrier()

    def init_trackers(self, project: str, config: dict[str, Any]) -> None:
        pass  # metrics go to metrics.jsonl (written by the loop) and the log

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def end(self) -> None:
        barrier()


class _NoEarlyEOS(torch.nn.Module):
    """The actor with EOS forbidden until ``min_new`` tokens were generated (``--min_response_length``)."""

    def __init__(self, model: Transformer, eos_id: int | None, min_new: int, prompt_len: int) -> None:
        super().__init__()
        self.model, self.args = model, model.args
        self.eos_id, self.min_new, self.prompt_len = eos_id, min_new, prompt_len

    def forward(self, tokens, attention_mask=None, cache=None, start_pos=0) -> torch.Tensor:
        logits = self.model(tokens, attention_mask, cache=cache, start_pos=start_pos)
        generated = start_pos + tokens.shape[1] - self.prompt_len  # tokens before the one these logits pick
        if self.eos_id is not None and generated < self.min_new:
            logits[:, -1, self.eos_id] = float("-inf")
        return logits


class TPGenerator:
    """``generate(prompt_ids, prompt_mask)`` on the TP actor; responses right-padded after the EOS."""

    def __init__(self, generation_model, sampling: SamplingConfig) -> None:
        if sampling.top_k > 0:
            raise ConfigError("--top_k is not supported by the TP generation engine (use --top_p)")
        self.generation_model = generation_model  # context manager yielding the actor
        self.sampling = sampling

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Generation:
        cfg = self.sampling
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        with self.generation_model() as actor:
            out = generate(
                _NoEarlyEOS(actor, cfg.eos_token_id, cfg.min_new_tokens, prompt_ids.shape[1]),
                prompts, max_gen_len=cfg.max_new_tokens, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p,
            )  # fmt: skip
        rows = []
        for tokens in out.tokens:  # EOS is not in ``tokens``: a row shorter than the limit stopped at EOS
            ended = len(tokens) < cfg.max_new_tokens and cfg.eos_token_id is not None
            rows.append(tokens + [cfg.eos_token_id] if ended else tokens)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return Generation(ids.to(prompt_ids.device), mask.to(prompt_ids.device))
