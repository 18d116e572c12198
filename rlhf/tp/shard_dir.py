"""The shard dir on disk: what ``checkpoint_split.py`` and the TP trainers write and every TP command reads.

Layout::

    consolidated.00.pth ... consolidated.{N-1}.pth   one state dict per rank (shard key names)
    params.json                                      ModelArgs fields, n_shards, hf_config (+ "head")
    config.json, tokenizer files, ...                copied from the source, so the dir is self-contained

``params.json`` marks a shard dir. Its ``"head"`` is ``"scalar"`` for a verifier or critic (``v_head``
instead of ``output``); absent or ``"lm"`` otherwise. Reading checks what a user can get wrong before
any tensor is used: a malformed or incomplete ``params.json``, a shard count that is not the world
size, a missing or truncated shard file; each is a one-line :class:`~rlhf.errors.CheckpointError`
naming the file. Writing is collective (every rank writes its shard) and published atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf.args import check_output_dir
from rlhf.errors import CheckpointError, ConfigError
from rlhf.models.loading import adapter_base_path, is_adapter_dir
from rlhf.publish import publish_dir, staging_dir, staging_path
from rlhf.tp.distributed import barrier, is_main
from rlhf.tp.hf_checkpoint import aux_files, load_tensor_file, read_hf_config, read_json
from rlhf.tp.key_maps import HEADS, model_args_from_params, params_dict
from rlhf.tp.model import ModelArgs

logger = logging.getLogger(__name__)

PARAMS = "params.json"
# keys every params.json written by this package has; the other ModelArgs fields have defaults
REQUIRED_PARAMS = (
    "family",
    "dim",
    "n_layers",
    "n_heads",
    "vocab_size",
    "hidden_dim",
    "n_shards",
    "hf_config",
)


def shard_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.pth"


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS).is_file()


def check_save_dir(save_dir: str | os.PathLike, flag: str, inputs: Mapping[str, str | None]) -> None:
    """A TP trainer replaces ``save_dir`` as a whole when it publishes its model, so it must be a new or
    empty directory or a model saved there before (``params.json``: a re-run replaces it), and neither the
    working directory, a filesystem root, nor one of the run's ``inputs`` (``{"--flag": path}``) or a
    directory holding one. Raises a one-line ConfigError naming ``flag``."""
    check_output_dir(save_dir, flag)
    path = Path(save_dir).resolve()
    if path == Path.cwd().resolve() or path == path.parent:
        raise ConfigError(
            f"{flag} {save_dir}: name a directory of its own (it is replaced as a whole at the end)"
        )
    for name, source in inputs.items():
        if source and (path == Path(source).resolve() or path in Path(source).resolve().parents):
            raise ConfigError(
                f"{flag} {save_dir} is or holds {name} {source}, and it is replaced as a whole at the end: give "
                "it a directory of its own"
            )
    if path.is_dir() and not is_shard_dir(path):
        others = sorted(p.name for p in path.iterdir())
        if others:
            raise ConfigError(
                f"{flag} {save_dir} holds files that are no saved model ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}), and it is replaced as a whole at the end: give a new or "
                "empty directory"
            )


def read_params(shard_dir: str | os.PathLike) -> dict:
    """``params.json`` of a shard dir, checked: valid JSON, the required keys, a shard count >= 1, a
    known head."""
    path = Path(shard_dir) / PARAMS
    if not path.is_file():
        raise CheckpointError(f"{shard_dir}: no {PARAMS} (not a shard dir written by checkpoint_split.py)")
    params = read_json(path)
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (not written by checkpoint_split.py?)")
    n = params["n_shards"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CheckpointError(f"{path}: n_shards must be a positive integer, got {n!r}")
    if not isinstance(params["hf_config"], dict):
        raise CheckpointError(f"{path}: hf_config must be an object (the source's config.json)")
    if params.get("head", "lm") not in HEADS:
        raise CheckpointError(f"{path}: head must be one of {', '.join(HEADS)}, got {params['head']!r}")
    return params


def shard_files(shard_dir: str | os.PathLike, n: int) -> list[Path]:
    files = sorted(Path(shard_dir).glob("consolidated.*.pth"))
    expected = [Path(shard_dir) / shard_name(r) for r in range(n)]
    if files != expected:
        raise CheckpointError(
            f"{shard_dir}: params.json says {n} shards, found {len(files)} consolidated.*.pth"
        )
    return files


def _check_world_size(shard_dir: str | os.PathLike, n: int, world_size: int) -> None:
    if n != world_size:
        raise CheckpointError(
            f"{shard_dir} holds {n} shards but the model-parallel world size is {world_size} (run with "
            f"--nproc_per_node {n}, or merge it with checkpoint_split.py --merge --ckpt_dir {shard_dir} "
            f"--save_path HF_DIR and pass HF_DIR, which is split in memory, or its re-split with -n {world_size})"
        )


def check_shard_dir(shard_dir: str | os.PathLike, world_size: int | None = None) -> dict:
    """Cheap up-front check of a whole shard dir (no tensor is read): ``params.json``, the shard count
    (against ``world_size`` when given) and every shard file's zip directory, which a truncated file
    lacks. Returns the params."""
    params = read_params(shard_dir)
    if world_size is not None:
        _check_world_size(shard_dir, params["n_shards"], world_size)
    for path in shard_files(shard_dir, params["n_shards"]):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({exc})") from None
    return params


def load_shard(shard_dir: str | os.PathLike, rank: int, world_size: int) -> tuple[ModelArgs, dict]:
    """(architecture, this rank's state dict) of a shard dir; its shard count must equal the world size."""
    params = read_params(shard_dir)
    _check_world_size(shard_dir, params["n_shards"], world_size)
    files = shard_files(shard_dir, params["n_shards"])
    return model_args_from_params(params), load_tensor_file(files[rank])


def load_all_shards(shard_dir: str | os.PathLike) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(params, every shard's state dict, memory-mapped) for merging."""
    params = read_params(shard_dir)
    return params, [load_tensor_file(f) for f in shard_files(shard_dir, params["n_shards"])]


# what PEFT writes into an adapter dir besides its weights: not part of a model dir built from it
ADAPTER_ONLY_FILES = ("adapter_config.json", "README.md")


def source_hf_config(ckpt_dir: str | os.PathLike) -> dict:
    """The original config.json of a shard dir (from params.json), of an HF model dir, or of the base
    model an adapter dir names (the architecture of the model built from it, the adapter merged)."""
    if is_shard_dir(ckpt_dir):
        return read_params(ckpt_dir)["hf_config"]
    if is_adapter_dir(ckpt_dir):
        return read_hf_config(adapter_base_path(ckpt_dir))[0]
    return read_hf_config(ckpt_dir)[0]


def source_aux_files(source_dir: str | os.PathLike) -> list[Path]:
    """The non-weight files (tokenizer, generation config, remote code) a dir built from ``source_dir``
    gets. An adapter dir: its base model's, overlaid with the adapter's own tokenizer files when it has
    a tokenizer (the one :func:`rlhf.models.loading.load_tokenizer` reads), never the adapter's config
    or model card (the saved dir is a plain model, not an adapter)."""
    if not is_adapter_dir(source_dir):
        return aux_files(Path(source_dir))
    files = {p.name: p for p in aux_files(Path(adapter_base_path(source_dir)))}
    if (Path(source_dir) / "tokenizer_config.json").is_file():
        own = [p for p in aux_files(Path(source_dir)) if p.name not in ADAPTER_ONLY_FILES]
        files.update({p.name: p for p in own})
    return [files[name] for name in sorted(files)]


def write_shard(state: dict[str, torch.Tensor], directory: Path, rank: int) -> None:
    torch.save(state, Path(directory) / shard_name(rank))


def write_metadata(
    directory: Path, args: ModelArgs, n: int, hf_config: dict, aux_dir: Path | None, head: str | None = None
) -> None:
    """``params.json`` (with ``head`` when given), the source's config.json (tokenizer loaders read it)
    and its tokenizer files (:func:`source_aux_files` of ``aux_dir``)."""
    params = params_dict(args, n, hf_config) | ({"head": head} if head is not None else {})
    (directory / PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for path in source_aux_files(aux_dir) if aux_dir is not None else []:
        shutil.copy2(path, directory / path.name)


@contextmanager
def collective_staging(final: str | os.PathLike) -> Iterator[Path]:
    """A staging dir for ``final`` that every rank writes into (collective: call on every rank).

    Rank 0 creates it empty before the ranks write and publishes it in place of ``final`` after all of
    them are done (:mod:`rlhf.publish`). On an error nothing is published."""
    final = Path(final)
    if is_main():
        staging_dir(final)
    barrier()
    yield staging_path(final)
    barrier()
    if is_main():
        publish_dir(staging_path(final), final)
    barrier()


def write_model_shards(
    model: torch.nn.Module, directory: Path, source_dir: str | os.PathLike, head: str = "lm"
) -> None:
    """Every rank writes its shard of a running TP model into ``directory``; rank 0 also ``params.json``
    (with ``head``), config.json and the tokenizer files of ``source_dir`` (where the model came from: a
    shard dir, an HF model dir, or an adapter dir, whose base gives the config).

    Call on every rank, after :func:`rlhf.tp.lora.merge_lora` when the model carries LoRA weights.
    """
    import fairscale.nn.model_parallel.initialize as fs_init

    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    if any(".lora_" in k for k in state):
        raise CheckpointError("merge the LoRA weights (rlhf.tp.lora.merge_lora) before saving shards")
    write_shard(state, directory, rank)
    if rank == 0:
        config = source_hf_config(source_dir)
        write_metadata(directory, model.args, world_size, config, Path(source_dir), head)


def save_model_shards(
    model: torch.nn.Module, save_path: str | os.PathLike, source_dir: str | os.PathLike, head: str = "lm"
) -> None:
    """Save a running TP model as a shard dir at ``save_path`` (:func:`write_model_shards`, published
    atomically). Call on every rank."""
    with collective_staging(save_path) as tmp:
        write_model_shards(model, tmp, source_dir, head)
    if is_main():
        logger.info("saved %s shards to %s", head, save_path)
