"""Split a Hugging Face checkpoint into tensor-parallel shards, or merge shards back into an HF model dir.

Split (one file of any dict of tensors, with config.json and the tokenizer next to it, or an HF model dir)::

    python checkpoint_split.py --ckpt_file /path/to/checkpoint.bin --save_path /path/to/save/ --n 8
    torchrun checkpoint_split.py --ckpt_file /path/to/model_dir --save_path /path/to/save/ -n 8
    torchrun --nproc_per_node 4 checkpoint_split.py ... -n 8   # 4 processes share the 8 shards

(torchrun's own parser on Python 3.11 rejects ``--n`` as an ambiguous abbreviation of its flags: under
torchrun, spell it ``-n``.)

writes ``consolidated.00.pth`` ... ``consolidated.07.pth``, ``params.json`` and the tokenizer files.

Merge (the inverse: an HF dir that ``AutoModelForCausalLM.from_pretrained`` loads)::

    python checkpoint_split.py --merge --ckpt_dir /path/to/save/ --save_path /path/to/hf_model/

(one process merges; under torchrun with several, rank 0 does and the others have nothing to do.)

See ``docs/tp.md`` for the shard layout and the per-family key maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.args import parse_args
from rlhf.errors import ConfigError, exit_on_user_error
from rlhf.logging_setup import setup_logging
from rlhf.tp.distributed import process_group_scope
from rlhf.tp.split_merge import merge_to_dir, split_to_dir


@dataclass
class SplitArguments:
    save_path: str = field(metadata={"help": "output dir (shards for a split, an HF model dir for --merge)"})
    ckpt_file: str | None = field(
        default=None,
        metadata={
            "help": "checkpoint to split: a .bin/.pth/.safetensors file (any dict of tensors) or an HF dir"
        },
    )
    n: int = field(
        default=1,
        metadata={
            "help": "number of shards (the tensor-parallel world size); -n under torchrun",
            "aliases": ["-n"],
        },
    )
    config_dir: str | None = field(
        default=None,
        metadata={"help": "dir with config.json and the tokenizer (default: the checkpoint's own dir)"},
    )
    merge: bool = field(
        default=False, metadata={"help": "merge the shards of --ckpt_dir into an HF model dir"}
    )
    ckpt_dir: str | None = field(default=None, metadata={"help": "shard dir to merge (with --merge)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --save_path"})
    max_shard_size_gb: float = field(
        default=5.0, metadata={"help": "--merge: largest safetensors file before splitting into several"}
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> str:
    setup_logging()
    (args,) = parse_args((SplitArguments,), argv)
    if args.merge:
        if not args.ckpt_dir:
            raise ConfigError("--merge needs --ckpt_dir (the shard dir to merge)")
        if not Path(args.ckpt_dir).is_dir():
            raise ConfigError(f"--ckpt_dir {args.ckpt_dir}: no such directory")
        if os.environ.get("RANK", "0") != "0":  # several torchrun processes: one writer, the others idle
            return args.save_path
        merge_to_dir(args.ckpt_dir, args.save_path, args.overwrite, args.max_shard_size_gb)
        return args.save_path
    if not args.ckpt_file:
        raise ConfigError("--ckpt_file is required (or pass --merge --ckpt_dir DIR)")
    if not Path(args.ckpt_file).exists():
        raise ConfigError(f"--ckpt_file {args.ckpt_file}: no such file or directory")
    with process_group_scope():  # under torchrun: leave only when every process is done
        rank, world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several torchrun processes share the shards
            import torch.distributed as dist

            dist.init_process_group("gloo")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        split_to_dir(
            args.ckpt_file,
            args.save_path,
            args.n,
            config_dir=args.config_dir,
            overwrite=args.overwrite,
            rank=rank,
            world_size=world_size,
        )
    return args.save_path


if __name__ == "__main__":
    main()
