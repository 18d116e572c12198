"""What ``solver_train`` and ``verifier_train`` leave in ``--save_dir``, and how it gets there.

- ``consolidated.NN.pth`` + ``params.json`` + tokenizer, LoRA merged into the shards
  (:func:`rlhf.tp.shard_dir.write_model_shards`), so every TP command and ``checkpoint_split.py --merge``
  take the dir as it is;
- ``adapter/`` with LoRA: ``adapter_config.json`` (r, alpha, targets, base, head, n_shards) and
  ``adapter.NN.safetensors`` per rank, this rank's ``lora_A``/``lora_B`` slices in the layout of
  :mod:`rlhf.tp.lora` (plus ``v_head.weight`` for a verifier);
- ``training/metrics.jsonl`` (one line per ``--log_steps`` steps) and ``training/results.json``. A
  sub-dir, so it is not copied along when the dir is used as a source.

Everything is written into the staging dir of ``--save_dir`` (``.NAME.tmp``, see :mod:`rlhf.publish`)
and published at the end in one rename; while training runs, the metrics grow in
``.NAME.tmp/training/metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rlhf.publish import write_text_atomic
from rlhf.tp.lora import lora_state_dict, merge_lora
from rlhf.tp.model import Transformer
from rlhf.tp.shard_dir import write_model_shards
from rlhf.tp.train_args import TPTrainArguments

ADAPTER_DIR = "adapter"
TRAINING_DIR = "training"


def metrics_path(out: Path) -> Path:
    return Path(out) / TRAINING_DIR / "metrics.jsonl"


def write_adapter(out: Path, adapter: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """``out/adapter``: this rank's LoRA tensors as ``adapter.NN.safetensors``; rank 0 also writes
    ``adapter_config.json`` (``config`` plus ``n_shards``). Call on every rank."""
    import fairscale.nn.model_parallel.initialize as fs_init

    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    directory = Path(out) / ADAPTER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter.items()}
    save_file(tensors, str(directory / f"adapter.{rank:02d}.safetensors"))
    if rank == 0:
        text = json.dumps({**config, "n_shards": world_size}, indent=2) + "\n"
        (directory / "adapter_config.json").write_text(text)


def write_trained_model(out: Path, model: Transformer, args: TPTrainArguments, scalar_head: bool) -> None:
    """The shards with the LoRA weights merged in and, with LoRA, the adapter on its own. Call on every
    rank; the model has no adapters afterwards."""
    spec = args.lora_spec()
    head = "scalar" if scalar_head else "lm"
    adapter = lora_state_dict(model) if spec.use_lora else {}
    if scalar_head and adapter:
        adapter["v_head.weight"] = model.v_head.weight.detach().clone()
    merge_lora(model)
    write_model_shards(model, out, args.ckpt_dir, head=head)
    if adapter:
        config = {
            "r": spec.rank,
            "alpha": spec.alpha,
            "targets": spec.targets,
            "base": str(args.ckpt_dir),
            "head": head,
        }
        write_adapter(out, adapter, config)


def write_results(out: Path, results: dict[str, Any], settings: dict[str, Any]) -> None:
    """``training/results.json``: the run's results and the settings it ran with (rank 0 only)."""
    path = Path(out) / TRAINING_DIR / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({**results, "settings": settings}, indent=2) + "\n")
