"""Importing ground truth from a CSV file: read it, check every line, match the images.

All or nothing: a line with an unknown label or no key stops the import before anything is
written, with the line numbers; lines that match no image are listed and skipped (the images
may not have arrived yet, or belong to another site).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from db.exceptions import LabelError
from db.labels import MATCH_KEYS, add_labels, check_label, match_images
from db.session import session_scope

MAX_ROWS = 1_000_000


@dataclass
class LabelImport:
    """What an import found: the key it matched by, the pairs to store, the lines left out."""

    key: str
    pairs: list[tuple[int, str]] = field(default_factory=list)
    """(image id, label) for every matched image (a value may match several images)."""
    matched_lines: int = 0
    unmatched: list[tuple[int, str]] = field(default_factory=list)
    """(line number, the key's value) of lines that matched no image."""
    stored: int = 0


def read_label_csv(path: Path, source: str, by: str) -> tuple[str, list[tuple[int, str, str]]]:
    """(key column, [(line number, key value, label)]) or LabelError naming the bad lines."""
    try:
        return _read_label_csv(path, source, by)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None


def _read_label_csv(path: Path, source: str, by: str) -> tuple[str, list[tuple[int, str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        keys = [k for k in MATCH_KEYS if k in columns]
        if "label" not in columns or len(keys) != 1:
            raise LabelError(f"{path}: needs a `label` column and exactly one of "
                             f"{', '.join(MATCH_KEYS)} (found: {', '.join(columns) or 'none'})")
        key, rows, bad = keys[0], [], []
        for number, raw in enumerate(reader, start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            try:
                label = check_label(row.get("label", ""), source, by)[0]
                if not row.get(key):
                    raise LabelError(f"no {key}")
            except LabelError as exc:
                bad.append(f"line {number}: {exc}")
                continue
            rows.append((number, row[key], label))
            if len(rows) > MAX_ROWS:
                raise LabelError(f"{path}: more than {MAX_ROWS:,} lines; split the file")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise LabelError(f"{path}: nothing imported, {len(bad)} bad line(s): {shown}")
    return key, rows


def import_labels(db_url: str, path: Path, *, source: str = "import", by: str,
                  dry_run: bool = False) -> LabelImport:
    """Match the file's lines to images and (unless ``dry_run``) store one label per image."""
    check_label("NORMAL", source, by)
    key, rows = read_label_csv(path, source, by)
    result = LabelImport(key)
    with session_scope(db_url) as session:
        found = match_images(session, key, [value for _, value, _ in rows])
        for number, value, label in rows:
            ids = found.get(value)
            if not ids:
                result.unmatched.append((number, value))
                continue
            result.matched_lines += 1
            result.pairs += [(image_id, label) for image_id in ids]
        if not dry_run:
            result.stored = add_labels(session, result.pairs, source, by)
    return result
