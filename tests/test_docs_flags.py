"""docs/ppo.md's flag tables list every flag of run_ppo_with_peft.py with the default the code has; the
README's file list names every source file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rlhf.ppo.config import PPOArguments, PPODataArguments, PPOModelArguments, PPOTrainingArguments

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ppo.md"
ROW = re.compile(r"^\| `--([a-z_0-9]+)` \| `?([^|`]*)`? \|", re.MULTILINE)


def documented_defaults() -> dict[str, str]:
    return {name: default.strip() for name, default in ROW.findall(DOCS.read_text())}


@pytest.mark.parametrize("group", [PPOModelArguments, PPOArguments, PPOTrainingArguments])
def test_every_flag_has_a_row_with_its_default(group):
    rows = documented_defaults()
    for field in dataclasses.fields(group):
        assert field.name in rows, f"--{field.name} has no row in {DOCS.name}'s flag tables"
        default = "required" if field.default is dataclasses.MISSING else str(field.default)
        shown = rows[field.name]
        # a long default may be cut short with "...": what is shown must still be its start
        assert default == shown or (shown.endswith("...") and default.startswith(shown[:-3])), field.name


def test_the_data_flags_are_named_in_the_text():
    text = DOCS.read_text()
    for field in dataclasses.fields(PPODataArguments):
        assert f"`--{field.name}`" in text, field.name


def readme_file_list() -> list[str]:
    """The paths (or glob patterns) of the README's "Files" section, one per line."""
    text = (DOCS.parents[1] / "README.md").read_text()
    section = text[text.index("## Files") :]
    block = section.split("```")[1]
    return [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def test_the_readme_names_every_source_file_and_no_file_that_is_gone():
    import fnmatch

    repo = DOCS.parents[1]
    listed = readme_file_list()
    sources = [*repo.glob("*.py"), *(repo / "rlhf").rglob("*.py"), *(repo / "bench").glob("*.py"),
               *(repo / "tests").glob("*.py")]  # fmt: skip
    for path in sorted(p.relative_to(repo).as_posix() for p in sources):
        assert any(fnmatch.fnmatch(path, entry) for entry in listed), f"README.md's file list lacks {path}"
    for entry in listed:
        assert list(repo.glob(entry.rstrip("/"))), f"README.md lists {entry}, which is not in the repository"
