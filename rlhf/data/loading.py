"""Loading a ``--dataset_dir`` into a ``datasets.Dataset`` of normalized rows, cached in ``--data_cache_dir``.

Rows are validated and normalized by the parsers in :mod:`rlhf.data.records` inside a
``Dataset.from_generator`` whose fingerprint covers every file's path, size and modification time and the
data code (:mod:`rlhf.data.code_version`), so the Arrow cache in ``--data_cache_dir`` is reused until a
file or that code changes. Errors surface as one
:class:`~rlhf.errors.DataError` line naming the file and line (``datasets`` wraps generator errors; we
unwrap them). Every row also carries its ``"where"`` (``file:line``), so an error found later, such as a
chat template that rejects the row's conversation, names the row too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch

from rlhf.args import check_output_dir
from rlhf.data.code_version import data_code_version
from rlhf.data.files import TEXT_EXTENSIONS, find_data_files, iter_json_records, iter_text_lines
from rlhf.data.records import FEATURES, PARSERS
from rlhf.errors import ConfigError, DataError, find_user_error

logger = logging.getLogger(__name__)


def _file_stamps(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _generate_rows(kind: str, stamps: list[tuple[str, int, int]], code: str = "") -> Iterator[dict]:
    """The rows of the files (``code``, :func:`data_code_version`, only keys the cache)."""
    parse = PARSERS[kind]
    for path, _, _ in stamps:
        for where, record in iter_json_records(Path(path)):
            yield {**parse(record, where), "where": where}


TEXT_ROW_CHARS = 1 << 18  # a text file's rows: whole lines, about this many characters each


def _generate_text(stamps: list[tuple[str, int, int]], code: str = "") -> Iterator[dict]:
    """Each file's text in rows of whole lines (about :data:`TEXT_ROW_CHARS` each), so that tokenizing a
    row holds a bounded share of a large file in Python objects at a time."""
    for path, _, _ in stamps:
        lines, size, empty = [], 0, True
        for _, line in iter_text_lines(Path(path)):  # a line at a time: never the whole file in memory
            empty = empty and not line.strip()
            lines.append(line)
            size += len(line)
            if size >= TEXT_ROW_CHARS:
                yield {"text": "".join(lines)}
                lines, size = [], 0
        if empty:
            raise DataError(f"{path}: empty file")
        if lines:
            yield {"text": "".join(lines)}


def _from_generator(generator, gen_kwargs: dict, features: datasets.Features, cache_dir: str | None):
    check_output_dir(cache_dir, "--data_cache_dir")  # a file there: one line, not FileExistsError
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir
        )
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is not None:
            raise user_error from None
        raise


def load_dataset_dir(
    dataset_dir: str | os.PathLike, kind: str, cache_dir: str | None = None
) -> datasets.Dataset:
    """Every ``*.json``/``*.jsonl``/``*.jsonl.gz`` in ``dataset_dir`` (or that one file) as normalized rows.

    ``kind`` is one of ``sft``, ``preference``, ``prompt``, ``gsm8k`` (see :mod:`rlhf.data.records`); each
    row holds that kind's fields and ``"where"``, the ``file:line`` it came from.
    """
    if kind not in PARSERS:
        raise ConfigError(f"unknown data kind {kind!r} (expected one of {', '.join(PARSERS)})")
    files = find_data_files(dataset_dir)
    features = datasets.Features({**FEATURES[kind], "where": datasets.Value("string")})
    dataset = _from_generator(
        _generate_rows,
        {"kind": kind, "stamps": _file_stamps(files), "code": data_code_version()},
        features,
        cache_dir,
    )
    if len(dataset) == 0:
        raise DataError(f"{dataset_dir}: no records")
    logger.info("loaded %d %s records from %d file(s) in %s", len(dataset), kind, len(files), dataset_dir)
    return dataset


def load_text_dir(dataset_dir: str | os.PathLike, cache_dir: str | None = None) -> datasets.Dataset:
    """Every ``*.txt`` in ``dataset_dir`` as ``{"text"}`` rows of whole lines, in file order (pretraining
    data; a line is a document)."""
    files = find_data_files(dataset_dir, TEXT_EXTENSIONS)
    features = datasets.Features({"text": datasets.Value("string")})
    stamps = {"stamps": _file_stamps(files), "code": data_code_version()}
    return _from_generator(_generate_text, stamps, features, cache_dir)


def split_rows(rows: list[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) rows: a seeded random ``ratio`` share is held out (at least one row when > 0)."""
    if ratio <= 0 or len(rows) < 2:
        return list(rows), []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(rows) - 1, max(1, round(ratio * len(rows))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def split_dataset(
    dataset: datasets.Dataset, split_ratio: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out ``split_ratio`` of the rows for evaluation: at least one row when the ratio is > 0, and at
    most all rows but one (one warning line when the ratio rounds to every row)."""
    if not 0 <= split_ratio < 1:
        raise ConfigError(f"--split_ratio must be in [0, 1), got {split_ratio}")
    if split_ratio == 0 or len(dataset) < 2:
        return dataset, None
    n_eval = max(1, round(len(dataset) * split_ratio))
    if n_eval >= len(dataset):
        n_eval = len(dataset) - 1
        logger.warning("--split_ratio %g of %d rows leaves none to train on; holding out %d, training on 1",
                       split_ratio, len(dataset), n_eval)  # fmt: skip
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
