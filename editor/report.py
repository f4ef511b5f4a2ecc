"""Readable results: one markdown table writer for every script, and atomic text files."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(rows: list[dict], cols: list[str], missing: str = "") -> str:
    """Rows as a markdown table of `cols`: floats with 3 decimals, other values as text,
    `missing` where a row lacks a column."""
    def cell(row, col):
        if col not in row:
            return missing
        value = row[col]
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
