"""The supervised training loop shared by ``solver_train`` and ``verifier_train`` on the TP model.

Every rank runs the same loop on the same micro-batches (same seed, same order): the TP forward pass
returns the same logits (or scores) on every rank, so a loss computed from them is the same everywhere and
its backward pass fills each rank's slice of the gradients. The distributed part is the TP backend
(:class:`rlhf.tp.backend.TPBackend`): ``backward``, and ``step`` = clip by the whole-model gradient norm,
AdamW step, scheduler step, zero grads, once every ``--accumulation_steps`` micro-batches of
``--max_batch_size`` sequences. Metrics go through the same window and file as PPO's
(:mod:`rlhf.metrics`).

A task (solver or verifier) supplies the examples, a loss on a collated micro-batch and a held-out
evaluation; :func:`train_tp` does the rest, top to bottom: load (+ LoRA), train, evaluate, save
(:mod:`rlhf.tp.trained_dir` says what ``--save_dir`` holds).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.errors import DataError
from rlhf.interruption import StopSignals, TrainingInterrupted, rerun_resumes
from rlhf.metrics import MetricsFile, MetricsWindow
from rlhf.models.loading import load_tokenizer
from rlhf.optimizer import build_adamw
from rlhf.ppo.resume import check_settings_before_loading, resume_checkpoint, start_afresh
from rlhf.tp.backend import TPBackend
from rlhf.tp.distributed import device, init_model_parallel
from rlhf.tp.examples import Example, collate, micro_batches, shuffled
from rlhf.tp.loading import check_checkpoint, load_tp_model, resolve_tp_dtype
from rlhf.tp.lora import apply_lora
from rlhf.tp.model import Transformer
from rlhf.tp.shard_dir import collective_staging
from rlhf.tp.train_args import TPTrainArguments
from rlhf.tp.train_checkpoint import FitState, load_fit_checkpoint, save_fit_checkpoint
from rlhf.tp.trained_dir import metrics_path, write_results, write_trained_model

logger = logging.getLogger(__name__)

# (model, collated batch) -> (loss, {name: float}) for one micro-batch
LossFn = Callable[[Transformer, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
# (model, held-out examples, batch size, pad id) -> metrics, e.g. {"eval_loss": ..., "eval_accuracy": ...}
EvalFn = Callable[[Transformer, list[Example], int, int], dict[str, float]]


@dataclass
class TrainTask:
    """What differs between solver and verifier training."""

    scalar_head: bool  # load the model with a scalar head (verifier) instead of the LM head
    loss: LossFn
    evaluate: EvalFn | None = None


def build_model_for_training(
    args: TPTrainArguments, scalar_head: bool, rank: int, world_size: int, dev: torch.device
) -> Transformer:
    """The TP model from ``--ckpt_dir``; with LoRA frozen + adapters (a scalar head stays trainable)."""
    model = load_tp_model(
        args.ckpt_dir, rank=rank, world_size=world_size, device=dev,
        dtype=resolve_tp_dtype(args.dtype, dev, training=True), model_type=args.model_type,
        scalar_head=scalar_head,
    )  # fmt: skip
    spec = args.lora_spec()
    if spec.use_lora:
        apply_lora(model, spec, seed=args.seed)
        if scalar_head:
            model.v_head.weight.requires_grad_(True)
    return model


def fit(
    model: Transformer,
    backend: TPBackend,
    task: TrainTask,
    examples: list[Example],
    args: TPTrainArguments,
    total: int,
    pad_id: int,
    metrics_file: MetricsFile,
    resume_from: str | None = None,
) -> list[dict[str, Any]]:
    """``total`` optimizer steps over ``examples`` (reshuffled each epoch); returns the logged rows, which
    rank 0 also appends to ``metrics_file``: step, epoch, lr, the window means of the loss and the task's
    statistics, grad_norm (before clipping), tokens_per_second.

    A ``checkpoint-N`` goes into ``--output_dir`` every ``--save_steps`` steps and when a process gets
    Ctrl-C or SIGTERM (then the run stops: :mod:`rlhf.interruption`); ``resume_from`` continues such a
    checkpoint where it was written (:mod:`rlhf.tp.train_checkpoint`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_adamw(
        params, lr=args.lr, weight_decay=args.weight_decay, scheduler=args.lr_scheduler_type,
        warmup=args.warmup_steps, total_steps=total,
    )  # fmt: skip
    state, window = FitState(settings=args.resume_settings()), MetricsWindow()
    if resume_from:
        state = load_fit_checkpoint(Path(resume_from), backend, model, optimizer, scheduler, state.settings)
        window.values.update(state.pending)
        if backend.is_main:
            for row in state.log:  # the rows before the checkpoint, so the file reads as one run
                metrics_file.append(row)
    tokens, since = 0, time.perf_counter()
    progress = tqdm(total=total, initial=state.step, desc="train", disable=not backend.is_main)
    with StopSignals() as stop, progress:
        while state.step < total:
            chunks = micro_batches(shuffled(examples, args.seed + state.epoch), args.max_batch_size)
            for index, chunk in enumerate(chunks):
                if index < state.done_in_epoch:  # trained on before the checkpoint this run resumed from
                    continue
                batch = collate(chunk, pad_id, backend.device)
                loss, stats = task.loss(model, batch)  # the same on every rank
                value = loss.item()  # one host sync per micro-batch, for the check and the metrics
                if not math.isfinite(value):
                    raise DataError(f"non-finite training loss at step {state.step + 1}")
                backend.backward(loss / args.accumulation_steps)
                window.add({"loss": value, **stats})
                tokens += int(batch["attention_mask"].sum())
                state.micro, state.done_in_epoch = state.micro + 1, index + 1
                if state.micro % args.accumulation_steps:
                    continue
                norms = backend.step(
                    {"model": optimizer}, {"model": scheduler}, {"model": params}, args.max_grad_norm
                )
                window.add({"grad_norm": norms["model"]})
                state.step += 1
                progress.update(1)
                if state.step % args.log_steps == 0 or state.step == total:
                    now = time.perf_counter()
                    row = {"step": state.step, "epoch": state.epoch + 1, "lr": scheduler.get_last_lr()[0]}
                    row |= window.means()
                    row["tokens_per_second"] = tokens / max(now - since, 1e-9)
                    state.log.append(row)
                    window.reset()
                    tokens, since = 0, now
                    if backend.is_main:
                        metrics_file.append(row)
                        logger.info("step %d/%d: loss %.4f", state.step, total, row["loss"])
                final = state.step >= total
                stop_signal = 0 if final else stop.agreed(backend.device)
                if (args.save_steps and (state.step % args.save_steps == 0 or final)) or stop_signal:
                    state.pending = {k: list(v) for k, v in window.values.items()}
                    checkpoint = Path(args.output_dir) / f"checkpoint-{state.step}"
                    save_fit_checkpoint(
                        checkpoint, backend, model, optimizer, scheduler, state, args.save_total_limit
                    )
                    if stop_signal:
                        resumes = rerun_resumes(args.overwrite_output_dir, args.resume_from_checkpoint)
                        raise TrainingInterrupted(stop_signal, state.step, str(checkpoint), resumes)
                if final:
                    break
            else:  # the epoch ran out (not cut short by the last step)
                state.epoch, state.done_in_epoch = state.epoch + 1, 0
    return state.log


def train_tp(
    args: TPTrainArguments,
    task: TrainTask,
    make_examples: Callable[[Any], tuple[list[Example], list[Example]]],
) -> dict[str, Any]:
    """Load, train, evaluate and save. ``make_examples(tokenizer)`` returns (train, held-out) examples.
    Returns the results written to ``training/results.json``."""
    args.validate()
    resume = resume_checkpoint(args)  # checked before any model loads, and so are its settings
    check_settings_before_loading(resume, args.resume_settings())
    rank, world_size = init_model_parallel()
    check_checkpoint(args.ckpt_dir, world_size, model_type=args.model_type)  # now, not after the data
    dev = device()
    torch.manual_seed(args.seed)  # the same LoRA dropout masks on every rank
    tokenizer = load_tokenizer(args.ckpt_dir, trust_remote_code=args.trust_remote_code, padding_side="right")
    train_examples, eval_examples = make_examples(tokenizer)
    if not train_examples:
        raise DataError(f"{args.train_file}: no training examples")
    if args.eval_ratio > 0 and not eval_examples:
        logger.warning(
            "--eval_ratio %g: no held-out example is left (those held out do not fit --max_seq_len %d): "
            "no evaluation", args.eval_ratio, args.max_seq_len,
        )  # fmt: skip
    backend = TPBackend(rank)
    model = backend.prepare(build_model_for_training(args, task.scalar_head, rank, world_size, dev)).train()
    total = args.total_steps(len(train_examples))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if backend.is_main:
        logger.info(
            "training %d examples (%d held out) for %d optimizer steps: %d sequences per micro-batch x %d "
            "accumulation, TP=%d, %s", len(train_examples), len(eval_examples), total, args.max_batch_size,
            args.accumulation_steps, world_size,
            f"LoRA r={args.lora_rank}" if args.lora_spec().use_lora else "full",
        )  # fmt: skip
    if resume is None:
        start_afresh(Path(args.output_dir), backend)
    with collective_staging(args.save_dir) as out:
        started = time.perf_counter()
        metrics_file = MetricsFile(metrics_path(out))
        log = fit(model, backend, task, train_examples, args, total, pad_id, metrics_file, resume)
        results: dict[str, Any] = {
            "steps": log[-1]["step"],
            "train_examples": len(train_examples),
            "eval_examples": len(eval_examples),
            "first_loss": log[0]["loss"],
            "final_loss": log[-1]["loss"],
            "train_seconds": time.perf_counter() - started,
            "tensor_parallel": world_size,
        }
        if task.evaluate is not None and eval_examples:
            model.eval()
            with torch.no_grad():
                results |= task.evaluate(model, eval_examples, args.max_batch_size, pad_id)
        write_trained_model(out, model, args, task.scalar_head)
        if backend.is_main:
            write_results(out, results, asdict(args))
    if backend.is_main:
        logger.info("saved to %s: %s", args.save_dir, results)
    return results
