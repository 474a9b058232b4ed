"""Reading the model cards' fidelity tables: shared by the per-bundle fidelity tests (issue 15).

A fidelity table has the columns Item | Research code | Paper | This bundle | Status. In the
"This bundle" column, every `` `knob` = `value` `` names a top-level config id and its default
(the value as JSON where it parses, else as text); the tests compare these with the configs.
"""

from __future__ import annotations

import json
import re

HEADER = ["Item", "Research code", "Paper", "This bundle", "Status"]
STATUS = re.compile(r"(same|deviation|knob)")


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    return markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table line in ``text``, header and rule included."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def as_value(text: str):
    """A cell's value: parsed as JSON where it is JSON, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def fidelity_knobs(text: str) -> dict:
    """Check the fidelity table's shape in ``text``; return every `` `knob` = `value` `` of its bundle column."""
    header, _rule, *rows = table_rows(text)
    assert header == HEADER, header
    named = {}
    for row in rows:
        assert len(row) == len(HEADER), row
        assert STATUS.match(row[4]), row
        for knob, value in re.findall(r"`(\w+)` = `([^`]+)`", row[3]):
            named[knob] = as_value(value)
    return named
