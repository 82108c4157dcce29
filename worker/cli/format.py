"""How the command line shows rows: fixed-width tables, CSV and JSON.

File names and errors come from strangers: tables, and CSV written to a terminal, show control
characters as escapes (a name must not move the cursor or recolour the terminal); CSV written
to a file or pipe keeps the names byte for byte. CSV cells that a spreadsheet would run as a
formula are quoted. JSON escapes control characters itself.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from worker.settings import printable


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(str(c)) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def format_results_table(rows: list[dict[str, Any]]) -> str:
    """The columns of the ``results`` view a person reads first."""
    headers = ["id", "file_name", "status", "label", "p_pneumonia", "p_virus", "models",
               "review", "error"]
    lines = []
    for row in rows:
        models = ""
        if row["pneumonia_model"] is not None:
            models = f"p:v{row['pneumonia_model']}"
            if row["infection_model"] is not None:
                models += f" i:v{row['infection_model']}"
        lines.append(
            [
                str(row["id"]),
                clip(row["file_name"], 40),
                row["status"],
                row["label"] or "",
                probability(row["p_pneumonia"]),
                probability(row["p_virus"]),
                models,
                row.get("review") or "",
                clip(row["error"] or "", 60),
            ]
        )
    return format_table(headers, lines)


def write_rows(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """``rows`` to stdout as ``json`` or ``csv`` (the table form is the caller's)."""
    if fmt == "json":
        json.dump(rows, sys.stdout, default=str, indent=2)
        print()
    elif fmt == "csv":
        shown = printable if sys.stdout.isatty() else str
        writer = csv.DictWriter(sys.stdout, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: _csv_cell(v, shown) for k, v in row.items()} for row in rows)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _csv_cell(value: Any, shown: Callable[[str], str]) -> Any:
    """A CSV cell: formula-safe, and through ``shown`` (escapes on a terminal) when text."""
    value = spreadsheet_safe(value)
    return shown(value) if isinstance(value, str) else value


def probability(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def clip(value: str, width: int) -> str:
    value = printable(value)
    return value if len(value) <= width else value[: width - 1] + "…"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate (``=HYPERLINK(...)``) gets a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
