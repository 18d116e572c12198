"""docs/ppo.md's flag tables list every flag of run_ppo_with_peft.py with the default the code has."""

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
