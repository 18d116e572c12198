"""The SFT ``eval_loss`` from per-example sums: the same on any number of processes and eval batch size.

``eval_loss = sum_e sum_t loss_et / sum_e n_e`` over the learned tokens (label not -100) of every held-out
example ``e``: the mean token cross-entropy, as the training loss (with ``--label_smoothing_factor`` ε the
smoothed token loss ``CE + ε (z_y - mean_v z)``, as in training). Each example's (summed loss,
learned tokens) leave :meth:`rlhf.sft.stage.SFTTrainer.prediction_step` as its prediction row; Trainer
gathers those rows across processes and drops the copies that fill the last batches, and
:func:`sft_metrics` divides the totals. Trainer's own value, one mean per batch repeated per row, counted
those copies and weighed a short last batch as a full one; with a ``compute_loss_func`` it also divided by
the learned tokens of every process and multiplied by their number. A Mixtral router loss is not part of
it (it is no per-token quantity).

The loss is taken in chunks of rows, each chunk's float32 logits dropped after use, from the last hidden
states under the fused loss (no ``[tokens, vocab]`` logits, as in training) or from the model's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from rlhf.training.fused_loss import IGNORE_INDEX, chunk_rows, shift_targets


def example_of_positions(inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """((B*T,) example index of every position, number of examples) of a padded (B, T) batch, or of a
    packed (1, N) one (``--packing``), whose ``position_ids`` restart at 0 for every example."""
    input_ids = inputs["input_ids"]
    if "position_ids" in inputs and input_ids.shape[0] == 1:
        starts = (inputs["position_ids"].reshape(-1) == 0).long()
        return starts.cumsum(0) - 1, int(starts.sum())
    batch, width = input_ids.shape
    return torch.arange(batch, device=input_ids.device).repeat_interleave(width), batch


def example_loss_sums(
    rows: torch.Tensor,
    targets: torch.Tensor,
    examples: torch.Tensor,
    num_examples: int,
    to_logits: Callable[[torch.Tensor], torch.Tensor],
    epsilon: float = 0.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """(E, 2) float32 [summed token loss, learned tokens] of each example.

    - ``rows``: (N, D) one row per learned token (hidden states or logits), ``targets``: (N,) its next
      token, ``examples``: (N,) int64 its example in ``[0, E)``;
    - ``to_logits``: a chunk of rows -> (n, V) float32 logits; ``epsilon``: label smoothing ε.
    """
    sums = torch.zeros(num_examples, dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        logits = to_logits(rows[start : start + chunk])
        picked = logits.gather(1, targets[start : start + chunk, None]).squeeze(1)
        loss = torch.logsumexp(logits, dim=1) - picked
        if epsilon:
            loss = loss + epsilon * (picked - logits.mean(1))
        sums.index_add_(0, examples[start : start + chunk], loss)
    counts = torch.bincount(examples, minlength=num_examples).to(sums.dtype)
    return torch.stack([sums, counts], dim=1)


def lm_example_losses(
    inputs: dict[str, Any],
    source: torch.Tensor,
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """(E, 2) [summed token loss, learned tokens] per example of a batch with ``labels``.

    ``source`` is the last hidden states (B, T, H), with ``projection`` the ``lm_head``'s (weight (V, H),
    bias or None), or the logits (B, T, V) when ``projection`` is None; ``epsilon``: label smoothing ε.
    """
    targets = shift_targets(inputs["labels"].to(source.device))
    keep = targets != IGNORE_INDEX
    examples, num_examples = example_of_positions(inputs)
    rows = source.reshape(-1, source.shape[-1])[keep]
    if projection is None:
        to_logits, vocab = torch.Tensor.float, source.shape[-1]
    else:
        weight, bias = projection
        rows, vocab = rows.to(weight.dtype), weight.shape[0]  # the head runs in the weights' dtype

        def to_logits(h: torch.Tensor) -> torch.Tensor:
            logits = h @ weight.t()
            return (logits if bias is None else logits + bias).float()

    examples = examples.to(source.device)[keep]
    return example_loss_sums(
        rows, targets[keep], examples, num_examples, to_logits, epsilon, chunk_rows(vocab)
    )


def sft_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """``loss``: the summed token loss over the learned tokens of the (N, 2) rows of an evaluation; Trainer
    reports it as ``eval_loss``."""
    predictions = prediction.predictions
    if isinstance(predictions, (list, tuple)):  # --eval_do_concat_batches false
        predictions = np.concatenate(predictions)
    totals = np.asarray(predictions, dtype=np.float64).sum(0)
    return {"loss": float(totals[0] / totals[1]) if totals[1] else float("nan")}
