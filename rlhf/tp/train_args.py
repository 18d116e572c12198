"""Flags of ``solver_train`` and ``verifier_train`` (the Llama-RLHF description's, plus a few), checked up front.

The LoRA flags build one :class:`rlhf.models.lora.LoraSpec`, as in every stage. The TP stages train all
weights by default (``--lora_rank -1``, as the description's commands do); alpha and dropout default to
the spec's values, and ``--lora_target all`` is every projection (the spec's default set, by the TP
model's layer names ``wq wk wv wo w1 w2 w3``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.args import LoraArguments, check_output_dir
from rlhf.checkpoint_dirs import named_checkpoint
from rlhf.data.files import files_signature
from rlhf.errors import ConfigError
from rlhf.models.lora import LoraSpec
from rlhf.tp.lora import ALL_TARGETS
from rlhf.tp.shard_dir import check_save_dir


@dataclass
class TPTrainArguments:
    """Flags of ``solver_train`` and ``verifier_train``."""

    ckpt_dir: str = field(metadata={"help": "model to start from: a shard dir or an HF model dir"})
    save_dir: str = field(metadata={"help": "where the trained shards (+ params.json, tokenizer) go"})
    train_file: str = field(metadata={"help": "GSM8K rows (.json list or .jsonl, file or dir)"})
    model_type: str | None = field(
        default=None, metadata={"help": "family or preset (llama, llama-1-7b, qwen-7b, ...); checked"}
    )
    max_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward (micro-batch)"})
    lora_rank: int = field(default=-1, metadata={"help": "-1 (or 0) = full-parameter training; r > 0 = LoRA"})
    lora_alpha: float = field(default=LoraSpec.alpha, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_dropout: float = field(default=LoraSpec.dropout, metadata={"help": "LoRA dropout"})
    lora_target: str = field(
        default=ALL_TARGETS, metadata={"help": "comma list of wq,wk,wv,wo,w1,w2,w3 (or q_proj,...), or all"}
    )
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training rows"})
    max_seq_len: int = field(
        default=512,
        metadata={
            "help": "tokens per sequence: solver rows are cut to it, verifier rows longer than it are dropped"
        },
    )
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --epochs when > 0"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.0, metadata={"help": "warm-up steps (a value < 1 is a ratio)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off"})
    eval_ratio: float = field(
        default=0.05,
        metadata={
            "help": "share held out for evaluation (verifier: of the questions, all their rows; 0 = none)"
        },
    )
    log_steps: int = field(default=10, metadata={"help": "write training/metrics.jsonl every N steps"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where checkpoint-N/ go (default: <save_dir>_run)"}
    )
    save_steps: int = field(
        default=500,
        metadata={
            "help": "checkpoint every N optimizer steps, and on Ctrl-C/SIGTERM (then stop); 0 = only then"
        },
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "keep only the newest N checkpoints"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "checkpoint-N dir to resume (default: the newest one in --output_dir, if any)"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start afresh instead of resuming from the newest checkpoint in --output_dir "
                  "(its checkpoints are removed)"},
    )  # fmt: skip
    seed: int = field(default=42, metadata={"help": "seed for the data order, LoRA init and dropout"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own code (Qwen)"})

    def validate(self) -> None:
        """Flag checks that need no model or data: sizes, ratios, ``--save_dir`` and ``--output_dir`` not
        being files (``--output_dir`` defaults to ``<save_dir>_run``)."""
        for name in ("max_batch_size", "accumulation_steps", "max_seq_len", "log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.eval_ratio < 1:
            raise ConfigError(f"--eval_ratio must be in [0, 1), got {self.eval_ratio}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("--epochs must be > 0 (or pass --max_steps)")
        if self.save_steps < 0:
            raise ConfigError(f"--save_steps must be >= 0, got {self.save_steps}")
        inputs = {
            "--ckpt_dir": self.ckpt_dir,
            "--train_file": self.train_file,
            "--resume_from_checkpoint": named_checkpoint(self.resume_from_checkpoint),
        }
        check_save_dir(self.save_dir, "--save_dir", inputs)
        save_dir = Path(self.save_dir).resolve()
        if self.output_dir is None:
            self.output_dir = str(save_dir.with_name(save_dir.name + "_run"))
        check_output_dir(self.output_dir, "--output_dir")
        if Path(self.output_dir).resolve().is_relative_to(save_dir):
            raise ConfigError(
                f"--output_dir {self.output_dir} is inside --save_dir {self.save_dir}, which is replaced as a whole "
                "at the end (its checkpoints would go with it): put it next to it (default: <save_dir>_run)"
            )

    def resume_settings(self) -> dict[str, Any]:
        """The flags (and training data files) a run resumed from a checkpoint must share with the run that
        wrote it: what decides the data order, the batches, the model and the optimizer. Where things are
        written, how often, and the length of the run (``--max_steps``, ``--epochs``) may change."""
        free = ("save_dir", "output_dir", "save_steps", "save_total_limit", "resume_from_checkpoint",
                "overwrite_output_dir", "log_steps", "max_steps", "epochs", "trust_remote_code")  # fmt: skip
        settings = {k: v for k, v in asdict(self).items() if k not in free}
        return settings | {
            "files of --train_file": files_signature(self.train_file),
            "files of --ckpt_dir": files_signature(self.ckpt_dir),
        }

    # the adapter these flags ask for, read as every stage reads its --lora_* flags (LoraSpec.use_lora is
    # false for --lora_rank <= 0)
    lora_spec = LoraArguments.lora_spec

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the run: ``--max_steps``, else ``--epochs`` passes over ``n_examples`` in
        micro-batches of ``--max_batch_size``, ``--accumulation_steps`` micro-batches per step (>= 1)."""
        if self.max_steps > 0:
            return self.max_steps
        per_epoch = math.ceil(n_examples / self.max_batch_size)
        return max(1, math.floor(self.epochs * per_epoch / self.accumulation_steps))
