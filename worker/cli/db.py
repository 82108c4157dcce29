"""`cxr db upgrade|current` and `cxr results`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from db.vocabulary import DISCLAIMER, ImageStatus, Label


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="database schema: `cxr db upgrade`", description=__doc__)
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser(
        "upgrade",
        help="create or migrate the database to this code's schema",
        description="Create the database (SQLite by default) or migrate it to the latest schema.",
    )
    up.set_defaults(func=cmd_db_upgrade)
    cur = db_sub.add_parser("current", help="show the schema revision of the database")
    cur.set_defaults(func=cmd_db_current)

    res = sub.add_parser(
        "results",
        help="print classified images from the results table",
        description="Rows of the `results` view, newest first. " + DISCLAIMER,
    )
    res.add_argument("--status", choices=[s.value for s in ImageStatus])
    res.add_argument("--label", choices=[label.value for label in Label], type=str.upper)
    res.add_argument("--since", type=_parse_iso, help="ISO date/time; local time if no zone")
    res.add_argument("--limit", type=_parse_limit, default=50,
                     help=f"at most N rows (0: all; default 50; at most {MAX_LIMIT:,})")
    res.add_argument("--review", action="store_true",
                     help="only what needs a person: labels inside a stage's uncertain band "
                     "(review uncertain:<stage>) and images the input gate refused "
                     "(out_of_scope, no label)")
    res.add_argument("--format", choices=["table", "csv", "json"], default="table")
    res.add_argument("--history", type=int, metavar="ID",
                     help="every prediction image ID has had (production, shadow, re-score)")
    res.set_defaults(func=cmd_results)


MAX_LIMIT = 1_000_000
EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)


def _parse_iso(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
        if when.year < EARLIEST.year:
            raise argparse.ArgumentTypeError(f"{value!r} is before 1970: no result is that old")
        when = when if when.tzinfo else when.astimezone()
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None
    if when < EARLIEST:
        raise argparse.ArgumentTypeError(f"{value!r} is before 1970: no result is that old")
    return when


def _parse_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 0 <= limit <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 0 (all) and {MAX_LIMIT:,}")
    return limit


def cmd_db_upgrade(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import current_revision, upgrade
    from db.session import redacted_url

    settings.ensure_dirs()
    upgrade(settings.db_url)
    print(f"database {redacted_url(settings.db_url)} is at schema "
          f"{current_revision(settings.db_url)}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import current_revision, head_revision

    current = current_revision(settings.db_url)
    print(f"current: {current or '(empty)'}  head: {head_revision()}")
    return 0 if current == head_revision() else 1


def cmd_results(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from db.results import RESULT_COLUMNS, list_results
    from db.session import session_scope
    from worker.cli.format import format_results_table, write_rows

    check_schema(settings.db_url)
    if args.history is not None:
        from worker.cli.rollout import print_history

        with session_scope(settings.db_url) as session:
            return print_history(session, args.history)
    with session_scope(settings.db_url) as session:
        rows = list_results(
            session,
            status=args.status,
            label=args.label,
            since=args.since,
            limit=args.limit or None,
            review=args.review,
        )
    if args.format == "table":
        print(format_results_table(rows))
        print(f"\n{len(rows)} row(s). {DISCLAIMER}")
    else:
        write_rows(rows, RESULT_COLUMNS, args.format)
    return 0
