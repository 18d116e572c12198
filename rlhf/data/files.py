"""Finding data files and reading their records with file:line positions for error messages.

A ``--dataset_dir`` holds ``*.json`` (a JSON list of objects), ``*.jsonl`` and ``*.jsonl.gz`` files (one
object per line; lines end at ``\n`` or ``\r\n`` only, never at a U+2028 inside a string). Hidden files
and sub-directories (such as a ``cache/`` folder) are skipped; any other file is an error, so a typo such
as ``train.jsonl.txt`` is not silently ignored.

Files are UTF-8, with or without a byte-order mark. A ``.json`` file holds one list and nothing after it
but whitespace (a second list or object there is an error, not silently ignored).

Python's ``json`` accepts the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity`` (and turns
``1e999`` into infinity); a record holding such a number anywhere is rejected at its ``file:line``, so a
``"margin": NaN`` cannot turn a whole training run into NaN weights. So is a string holding an unpaired
surrogate escape such as ``"\\ud800"``: valid JSON syntax, but no text, which no tokenizer or Arrow file can
encode.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import DataError

JSON_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json")
TEXT_EXTENSIONS = (".txt",)


def find_data_files(path: str | os.PathLike, extensions: tuple[str, ...] = JSON_EXTENSIONS) -> list[Path]:
    """Return the data files at ``path`` (a file, or a directory scanned one level deep), sorted.

    Raises DataError for a missing path, an empty directory, or a file with an unknown extension.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    files = []
    for candidate in candidates:
        if not candidate.name.endswith(extensions):
            raise DataError(f"{candidate}: unknown extension (expected one of {', '.join(extensions)})")
        files.append(candidate)
    if not files:
        raise DataError(f"{path}: no data files (expected {', '.join(extensions)})")
    return files


def read_text(path: Path) -> str:
    """The whole file as UTF-8 text (transparently gunzipped; a leading byte-order mark dropped); DataError
    when it is not text."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: cannot read as UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads


READ_BYTES = 1 << 22  # a text file is read and decoded this many bytes (cut at a line end) at a time


def iter_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line of a UTF-8 text file (transparently gunzipped; a leading
    byte-order mark dropped), read :data:`READ_BYTES` at a time: memory stays near that, whatever the file's
    size (:func:`read_text` holds the whole text, up to 4 bytes per character). Lines end at ``\n``,
    ``\r\n`` or a lone ``\r`` (universal newlines, as text mode reads), and each line keeps its ending as
    ``\n`` (the file's last line may have none). DataError when the file is not text."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no, offset, newlines, pending = 0, 0, 0, []
    try:
        with opener(path, "rb") as handle:
            while True:
                block = handle.read(READ_BYTES)
                cut = block.rfind(b"\n") + 1  # 0 at the end of the file
                if block and not cut:  # no line ends here yet: a line longer than a block
                    pending.append(block)
                    continue
                piece = b"".join([*pending, block[:cut]])  # whole lines: never a UTF-8 character cut
                pending = [block[cut:]] if block[cut:] else []
                if not piece:
                    break
                start = 3 if offset == 0 and piece.startswith(b"\xef\xbb\xbf") else 0
                try:
                    text = piece[start:].decode("utf-8")
                except UnicodeDecodeError as exc:
                    line = newlines + piece.count(b"\n", 0, start + exc.start) + 1
                    raise DataError(
                        f"{path}:{line}: cannot read as UTF-8 text "
                        f"({exc.reason} at byte {offset + start + exc.start})"
                    ) from None
                offset, newlines = offset + len(piece), newlines + piece.count(b"\n")
                if "\r" in text:
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                for line in _split_keep_newline(text):
                    line_no += 1
                    yield line_no, line
                if not block:
                    break
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _split_keep_newline(text: str) -> list[str]:
    """``text`` cut after each ``\n`` (only: ``str.splitlines`` also cuts at U+2028 and others)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def iter_json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for every object in a .json/.jsonl/.jsonl.gz file.

    ``where`` is ``"file:line"``, the position to put in front of an error message about the record.
    A ``.json`` list is read whole; JSON lines are read a line at a time (:func:`iter_text_lines`).
    """
    if path.name.endswith(".json"):
        text = read_text(path)
        if not text.strip():
            raise DataError(f"{path}: empty file")
        items = _json_array_items(path, text)
    else:
        items = _jsonl_items(path)
    for line, value in items:
        where = f"{path}:{line}"
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        surrogate = find_unpaired_surrogate(value)
        if surrogate is not None:
            field, char = surrogate
            what = "in its name" if char == "key" else f"(\\u{ord(char):04x})"
            raise DataError(f'{where}: field "{field}" holds an unpaired surrogate {what}, which is not text')
        bad = find_non_finite(value)
        if bad is not None:
            field, number = bad
            raise DataError(f'{where}: field "{field}" is {number} (numbers in data must be finite)')
        yield where, value


def _children(value: Any, path: str) -> list[tuple[str, Any, Any]]:
    """The ``(field path, item, key)`` of a decoded JSON object's or list's members (key None in a list)."""
    if isinstance(value, dict):
        return [(f"{path}.{key}" if path else str(key), item, key) for key, item in value.items()]
    if isinstance(value, list):
        return [(f"{path}[{i}]", item, None) for i, item in enumerate(value)]
    return []


def find_non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first ``(field path, number)`` in a decoded JSON value that is NaN or infinite, else None.

    Field paths read like ``margin`` or ``messages[1].score``.
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    for item_path, item, _ in _children(value, path):
        found = find_non_finite(item, item_path)
        if found is not None:
            return found
    return None


def find_unpaired_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first ``(field path, character)`` in a decoded JSON value whose string holds a surrogate code point
    without its pair (JSON's ``"\\ud800"`` escape decodes to one), else None. For a key holding one the
    character is ``"key"`` and the path ends with the key, escaped."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, value[exc.start]
        return None
    for item_path, item, key in _children(value, path):
        if key is not None and find_unpaired_surrogate(key) is not None:  # the key: named escaped, printable
            return item_path.encode("utf-8", "backslashreplace").decode("utf-8"), "key"
        found = find_unpaired_surrogate(item, item_path)
        if found is not None:
            return found
    return None


def _json_reason(exc: ValueError) -> str:
    """The decoder's reason, or the first line of Python's own ``ValueError`` (an integer literal longer
    than ``sys.get_int_max_str_digits()`` digits)."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    return (str(exc).splitlines() or ["bad value"])[0]


def _jsonl_items(path: Path) -> Iterator[tuple[int, Any]]:
    """One JSON value per line, the lines of :func:`iter_text_lines`: they end at newlines only, where
    ``str.splitlines`` would also split at U+2028, U+2029, U+0085 and other separators that valid JSON may
    hold unescaped inside a string, and number the lines after them wrong. No value at all: DataError."""
    empty = True
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        empty = False
        try:
            yield line_no, json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
            raise DataError(f"{path}:{line_no}: not valid JSON ({_json_reason(exc)})") from None
    if empty:
        raise DataError(f"{path}: empty file")


def _json_array_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Decode a top-level JSON list element by element, remembering each element's first line."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: a .json data file must hold a JSON list")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        raise DataError(f"{path}: empty file (the JSON list has no records)")
    line, counted_to = 1, 0  # the line of ``pos``, counted on from the last element (linear in the file)
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
            where = exc.lineno if isinstance(exc, json.JSONDecodeError) else line
            raise DataError(f"{path}:{where}: not valid JSON ({_json_reason(exc)})") from None
        yield line, value
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            end = _skip_ws(text, pos + 1)
            if end < len(text):
                raise DataError(
                    f"{path}:{text.count(chr(10), 0, end) + 1}: not valid JSON (extra data after the list)"
                )
            return
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON (expected ',' or ']')")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def require_str(record: dict[str, Any], field: str, where: str, *, allow_empty: bool = True) -> str:
    """``record[field]`` as a string, or DataError naming ``where`` and the field."""
    if field not in record:
        raise DataError(f'{where}: missing field "{field}"')
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{field}" must be a string, got {type(value).__name__}')
    if not allow_empty and not value.strip():
        raise DataError(f'{where}: field "{field}" is empty')
    return value


def optional_str(record: dict[str, Any], field: str, where: str) -> str:
    """``record[field]`` when present (must be a string or null), else ``""``."""
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{field}" must be a string, got {type(value).__name__}')
    return value


def files_signature(path: str | os.PathLike | None) -> list[list[Any]]:
    """``[name, size, modification time in ns]`` of the file at ``path``, or of the files directly in the
    directory ``path`` (sorted; ``[]`` when there is nothing there): what tells two runs that read the same
    path whether its files changed in between (a model retrained into the same dir, edited data)."""
    if not path:
        return []
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.is_file())
        if path.is_dir()
        else []
    )
    return [[p.name, (stat := p.stat()).st_size, stat.st_mtime_ns] for p in files]
