"""`cxr labels import|add|export`: ground truth in and out (the `labels` table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from db.vocabulary import LABEL_SOURCES as SOURCES
from db.vocabulary import Label


def register(sub: argparse._SubParsersAction) -> None:
    labels = sub.add_parser(
        "labels", help="ground truth: import, add, export true labels",
        description="True labels for received images (a later label supersedes an earlier "
                    "one, which is kept). `cxr monitor` measures each model version on them.")
    labels_sub = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    imp = labels_sub.add_parser(
        "import", help="import labels from a CSV file",
        description="A CSV with a `label` column (NORMAL, BACTERIA, VIRUS, PNEUMONIA) and one "
                    "of `id` (the results row), `sha256`, `sop_instance_uid`, "
                    "`accession_number`. A sha256 or accession number labels every image "
                    "that has it.")
    imp.add_argument("file", type=Path)
    imp.add_argument("--dry-run", action="store_true",
                     help="say how many lines match and list those that do not; store nothing")
    imp.add_argument("--by", default="import", help="who gave these labels (default: import)")
    imp.add_argument("--source", choices=SOURCES, default="import")
    imp.set_defaults(func=cmd_labels_import)
    add = labels_sub.add_parser("add", help="label one image (a results row id)")
    add.add_argument("id", type=int)
    add.add_argument("label", type=str.upper, choices=[item.value for item in Label])
    add.add_argument("--by", required=True, help="who says so")
    add.add_argument("--source", choices=SOURCES, default="review")
    add.set_defaults(func=cmd_labels_add)
    exp = labels_sub.add_parser("export", help="write the labels as CSV (importable again)")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")
    exp.add_argument("--history", action="store_true",
                     help="every label given, not only each image's current one")
    exp.set_defaults(func=cmd_labels_export)


def cmd_labels_import(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from worker.ops.label_import import import_labels

    check_schema(settings.db_url)
    result = import_labels(settings.db_url, args.file, source=args.source, by=args.by,
                           dry_run=args.dry_run)
    lines = result.matched_lines + len(result.unmatched)
    verb = "would label" if args.dry_run else "labelled"
    print(f"{result.matched_lines} of {lines} line(s) matched by {result.key}: {verb} "
          f"{len(result.pairs)} image(s)")
    for number, value in result.unmatched:
        print(f"  line {number}: no image with {result.key} {value}")
    return 0


def cmd_labels_add(args: argparse.Namespace, settings: Any) -> int:
    from db.labels import add_label
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        add_label(session, args.id, args.label, args.source, args.by)
    print(f"image {args.id}: {args.label} (by {args.by}, {args.source})")
    return 0


def cmd_labels_export(args: argparse.Namespace, settings: Any) -> int:
    import csv

    from db.labels import EXPORT_COLUMNS, export_labels
    from db.migrate import check_schema
    from db.session import session_scope
    from worker.cli.format import spreadsheet_safe

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = export_labels(session, history=args.history)
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    try:
        writer = csv.DictWriter(out, fieldnames=list(EXPORT_COLUMNS))
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"{len(rows)} label(s) written to {args.out}", file=sys.stderr)
    return 0
