"""The supervised training loop shared by ``solver_train`` and ``verifier_train`` on the TP model.

Every rank runs the same loop on the same micro-batches (same seed, same order): the TP forward pass
returns the same logits (or scores) on every rank, so a loss computed from them is the same everywhere and
``loss.backward()`` fills each rank's slice of the gradients. One optimizer step every
``--accumulation_steps`` micro-batches of ``--max_batch_size`` sequences; gradients are clipped by their
norm over the whole model (:func:`rlhf.tp.distributed.clip_grad_norm`).

A task (solver or verifier) supplies the examples, a loss on a collated micro-batch and a held-out
evaluation; :func:`train_tp` does the rest: load, LoRA, optimise, log, save. Outputs in ``--save_dir``:

- ``consolidated.NN.pth`` + ``params.json`` + tokenizer (LoRA merged into the shards), via
  :func:`rlhf.tp.shard_dir.save_model_shards`;
- ``adapter/`` with ``--lora_rank`` > 0: the LoRA weights on their own (``adapter_config.json`` and
  ``adapter.NN.safetensors`` per rank, in the layout of :mod:`rlhf.tp.lora`);
- ``training/metrics.jsonl`` (one line per ``--log_steps`` steps) and ``training/results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from rlhf.args import split_comma_list
from rlhf.errors import ConfigError, DataError
from rlhf.models.loading import load_tokenizer
from rlhf.tp.distributed import barrier, clip_grad_norm, device, init_model_parallel, is_main
from rlhf.tp.loading import load_tp_model, resolve_tp_dtype
from rlhf.tp.lora import apply_lora, lora_state_dict, merge_lora
from rlhf.tp.model import Transformer
from rlhf.tp.shard_dir import save_model_shards

logger = logging.getLogger(__name__)


@dataclass
class TPTrainArguments:
    """Flags of ``solver_train`` and ``verifier_train`` (the Llama-RLHF description's, plus a few)."""

    ckpt_dir: str = field(metadata={"help": "model to start from: a shard dir or an HF model dir"})
    save_dir: str = field(metadata={"help": "where the trained shards (+ params.json, tokenizer) go"})
    train_file: str = field(metadata={"help": "GSM8K rows (.json list or .jsonl, file or dir)"})
    model_type: str | None = field(
        default=None, metadata={"help": "family or preset (llama, llama-1-7b, qwen-7b, ...); checked"}
    )
    max_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward (micro-batch)"})
    lora_rank: int = field(default=-1, metadata={"help": "-1 (or 0) = full-parameter training; r > 0 = LoRA"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target: str = field(
        default="all", metadata={"help": "comma list of wq,wk,wv,wo,w1,w2,w3 (or q_proj,...), or all"}
    )
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training rows"})
    max_seq_len: int = field(default=512, metadata={"help": "sequences are cut to this many tokens"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --epochs when > 0"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.0, metadata={"help": "warm-up steps (a value < 1 is a ratio)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off"})
    eval_ratio: float = field(
        default=0.05, metadata={"help": "share of the rows held out for evaluation (0 = none)"}
    )
    log_steps: int = field(default=10, metadata={"help": "write training/metrics.jsonl every N steps"})
    seed: int = field(default=42, metadata={"help": "seed for the data order, LoRA init and dropout"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own code (Qwen)"})

    @property
    def use_lora(self) -> bool:
        return self.lora_rank > 0

    def validate(self) -> None:
        for name in ("max_batch_size", "accumulation_steps", "max_seq_len", "log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.eval_ratio < 1:
            raise ConfigError(f"--eval_ratio must be in [0, 1), got {self.eval_ratio}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("--epochs must be > 0 (or pass --max_steps)")


@dataclass
class Example:
    """One training sequence: token ids, and per-token ``labels`` (-100 = no loss) or a sequence ``target``."""

    input_ids: list[int]
    labels: list[int] | None = None
    target: float | None = None


@dataclass
class TrainTask:
    """What differs between solver and verifier training."""

    scalar_head: bool  # load the model with a scalar head (verifier) instead of the LM head
    # (model, collated batch) -> (loss, {name: float}) for one micro-batch
    loss: Callable[[Transformer, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    # (model, held-out examples, batch size, pad id) -> metrics, e.g. {"eval_loss": ..., "eval_accuracy": ...}
    evaluate: Callable[[Transformer, list[Example], int, int], dict[str, float]] | None = None


def split_rows(rows: list[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) rows: a seeded random ``ratio`` share is held out (at least one row when > 0)."""
    if ratio <= 0 or len(rows) < 2:
        return list(rows), []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(rows) - 1, max(1, round(ratio * len(rows))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def collate(examples: list[Example], pad_id: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [B, T], ``labels`` [B, T] (-100 on padding) and/or
    ``targets`` [B]; ``last`` [B] is the column of each sequence's last real token."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if e.labels is not None:
            labels[row, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "last": mask.sum(1) - 1}
    if examples[0].target is not None:
        batch["targets"] = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return {k: v.to(dev) for k, v in batch.items()}


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def count_steps(n_examples: int, args: TPTrainArguments) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = math.ceil(n_examples / args.max_batch_size)
    return max(1, math.floor(args.epochs * per_epoch / args.accumulation_steps))


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_lora_adapter(adapter: dict[str, torch.Tensor], save_dir: Path, config: dict) -> None:
    """``save_dir/adapter``: this rank's LoRA tensors as ``adapter.NN.safetensors`` (all ranks call this)."""
    import fairscale.nn.model_parallel.initialize as fs_init

    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    final, tmp = save_dir / "adapter", save_dir / ".adapter.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file(
        {k: v.contiguous().cpu() for k, v in adapter.items()}, str(tmp / f"adapter.{rank:02d}.safetensors")
    )
    barrier()
    if rank == 0:
        (tmp / "adapter_config.json").write_text(
            json.dumps({**config, "n_shards": world_size}, indent=2) + "\n"
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_model_for_training(
    args: TPTrainArguments, scalar_head: bool, rank: int, world_size: int, dev: torch.device
) -> Transformer:
    """The TP model from ``--ckpt_dir``; with LoRA frozen + adapters (a scalar head stays trainable)."""
    model = load_tp_model(
        args.ckpt_dir, rank=rank, world_size=world_size, device=dev,
        dtype=resolve_tp_dtype(args.dtype, dev), model_type=args.model_type, scalar_head=scalar_head,
    )  # fmt: skip
    if args.use_lora:
        apply_lora(
            model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
            targets=split_comma_list(args.lora_target), seed=args.seed,
        )  # fmt: skip
        if scalar_head:
            model.v_head.weight.requires_grad_(True)
    return model


def build_optimizer(
    params: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup: float,
    total: int,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its learning-rate schedule over ``total`` steps (``warmup`` < 1 is a ratio)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup_steps = math.ceil(warmup * total) if 0 < warmup < 1 else int(warmup)
    try:
        schedule = get_scheduler(
            scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total
        )
    except ValueError as exc:
        raise ConfigError(f"--lr_scheduler_type {scheduler}: {exc}") from None
    return optimizer, schedule


def train_tp(
    args: TPTrainArguments,
    task: TrainTask,
    make_examples: Callable[[Any], tuple[list[Example], list[Example]]],
) -> dict[str, Any]:
    """Load, train and save. ``make_examples(tokenizer)`` returns (train, held-out) examples. Returns the
    results written to ``training/results.json``."""
    args.validate()
    rank, world_size = init_model_parallel()
    dev = device()
    torch.manual_seed(args.seed)  # the same LoRA dropout masks on every rank
    tokenizer = load_tokenizer(args.ckpt_dir, trust_remote_code=args.trust_remote_code, padding_side="right")
    train_examples, eval_examples = make_examples(tokenizer)
    if not train_examples:
        raise DataError(f"{args.train_file}: no training examples")
    model = load_model_for_training(args, task.scalar_head, rank, world_size, dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = count_steps(len(train_examples), args)
    optimizer, scheduler = build_optimizer(
        params, args.lr, args.weight_decay, args.lr_scheduler_type, args.warmup_steps, total
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if rank == 0:
        logger.info(
            "training %d examples (%d held out) for %d optimizer steps: %d sequences per micro-batch x %d "
            "accumulation, TP=%d, %s", len(train_examples), len(eval_examples), total, args.max_batch_size,
            args.accumulation_steps, world_size, f"LoRA r={args.lora_rank}" if args.use_lora else "full",
        )  # fmt: skip
    log: list[dict[str, Any]] = []
    pending: dict[str, list[float]] = {}
    step, micro, epoch, tokens, started = 0, 0, 0, 0, time.perf_counter()
    since = started
    while step < total:
        order = torch.randperm(
            len(train_examples), generator=torch.Generator().manual_seed(args.seed + epoch)
        )
        for chunk in micro_batches([train_examples[i] for i in order.tolist()], args.max_batch_size):
            batch = collate(chunk, pad_id, dev)
            loss, stats = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise DataError(f"non-finite training loss at step {step + 1}")
            (loss / args.accumulation_steps).backward()
            tokens += int(batch["attention_mask"].sum())
            for key, value in {"loss": loss.item(), **stats}.items():
                pending.setdefault(key, []).append(value)
            micro += 1
            if micro % args.accumulation_steps:
                continue
            norm = clip_grad_norm(model, args.max_grad_norm if args.max_grad_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.setdefault("grad_norm", []).append(norm)
            if step % args.log_steps == 0 or step == total:
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
                record |= {k: sum(v) / len(v) for k, v in pending.items()}
                record["tokens_per_second"] = tokens / max(now - since, 1e-9)
                log.append(record)
                pending, tokens, since = {}, 0, now
                if rank == 0:
                    logger.info("step %d/%d: loss %.4f", step, total, record["loss"])
            if step >= total:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    results: dict[str, Any] = {
        "steps": step,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "train_seconds": seconds,
        "tensor_parallel": world_size,
    }
    if task.evaluate is not None and eval_examples:
        model.eval()
        with torch.no_grad():
            results |= task.evaluate(model, eval_examples, args.max_batch_size, pad_id)
    save_trained_model(model, args, task.scalar_head)
    if is_main():
        out = Path(args.save_dir) / "training"
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        settings = {k: v for k, v in asdict(args).items()}
        _write_json_atomic(
            out / "results.json", json.dumps({**results, "settings": settings}, indent=2) + "\n"
        )
        logger.info("saved to %s: %s", args.save_dir, {k: v for k, v in results.items() if k != "settings"})
    barrier()
    return results


def save_trained_model(model: Transformer, args: TPTrainArguments, scalar_head: bool) -> None:
    """Shards with the LoRA weights merged in, and (LoRA) the adapter on its own in ``adapter/``."""
    adapter = lora_state_dict(model) if args.use_lora else {}
    if scalar_head and adapter:
        adapter["v_head.weight"] = model.v_head.weight.detach().clone()
    merge_lora(model)
    save_model_shards(model, args.save_dir, args.ckpt_dir, head="scalar" if scalar_head else "lm")
    if adapter:
        config = {
            "r": args.lora_rank, "alpha": args.lora_alpha, "targets": split_comma_list(args.lora_target),
            "base": str(args.ckpt_dir), "head": "scalar" if scalar_head else "lm",
        }  # fmt: skip
        save_lora_adapter(adapter, Path(args.save_dir), config)
