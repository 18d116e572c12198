"""The sources import on every Python that pyproject.toml admits, not only on the one CI runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("*.py"), *(REPO / "rlhf").rglob("*.py"), *(REPO / "bench").glob("*.py")])


def docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node, doc


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_docstrings_encode_as_utf8(path):
    """Python 3.13 cleans docstrings at compile time, through UTF-8: a lone surrogate such as an unescaped
    ``\\ud800`` in one made ``import rlhf.data`` fail there with a UnicodeEncodeError (fine on 3.11)."""
    for node, doc in docstrings(ast.parse(path.read_text(encoding="utf-8"))):
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError as error:
            line = getattr(node, "lineno", 1)
            pytest.fail(f"{path.relative_to(REPO)}:{line}: docstring holds {doc[error.start]!r}; escape it")
