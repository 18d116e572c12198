"""The data-preparation code's own fingerprint, part of every ``datasets`` cache key this package makes.

``datasets`` fingerprints a ``map`` or ``from_generator`` by its function and arguments, but it pickles a
function of an importable module by reference (module and name), not by its code. After an upgrade of this
package that changes how rows are parsed or tokenized, the Arrow cache in ``--data_cache_dir`` would hand
back rows made by the old code (or without a column the new code reads). Every cache key therefore includes
a hash of the sources of the modules that parse and tokenize data.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from datasets.fingerprint import Hasher

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DATA_CODE = ("data/*.py", "sft/examples.py", "reward/pairs.py")


@functools.cache
def data_code_version() -> str:
    """A short hash of the sources of :data:`DATA_CODE` (relative to the ``rlhf`` package)."""
    digest = hashlib.sha256()
    for pattern in DATA_CODE:
        for path in sorted(PACKAGE_ROOT.glob(pattern)):
            digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the ids a tokenizer gives: its whole fast tokenizer (vocabulary, merges,
    normalizer, pre-tokenizer, the post-processor that adds BOS/EOS, added tokens), chat template, special
    token ids and add-BOS/EOS flags. Not the rest of the object (``datasets`` hashes it whole): the dir it was
    loaded from, ``padding_side`` or ``HF_HUB_OFFLINE`` (``local_files_only``) changed the key and made an
    identical tokenizer tokenize everything again. A tokenizer without a fast backend is hashed whole."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    special = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")]
    flags = [getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token")]
    template = getattr(tokenizer, "chat_template", None)
    return Hasher.hash([type(tokenizer).__name__, backend.to_str(), template, special, flags])


def map_fingerprint(dataset: Any, step: str, **settings: Any) -> str:
    """The fingerprint of ``dataset.map`` for the transform named ``step`` with ``settings`` (a
    ``tokenizer`` by :func:`tokenizer_fingerprint`), under this data code."""
    if "tokenizer" in settings:
        settings = {**settings, "tokenizer": tokenizer_fingerprint(settings["tokenizer"])}
    return Hasher.hash([dataset._fingerprint, step, settings, data_code_version()])
