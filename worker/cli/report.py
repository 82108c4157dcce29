"""`cxr report --since ... [--label ...] --out review.html`: a review page of recent results."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from pathlib import Path

from db.vocabulary import DISCLAIMER, Label
from worker.cli.db import _parse_iso, _parse_limit
from worker.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML review page of recent results",
        description="One HTML file, images embedded, no server: a summary (counts per label "
        "and per status), a card per classified result (thumbnail as the model saw it, the "
        "heatmap where there is one, label, probabilities, model versions, times) and the "
        "rejected and failed files with their reasons. The page holds patient images and "
        "names; it is written readable by you only. " + DISCLAIMER,
    )
    p.add_argument("--since", type=_parse_iso,
                   help="ISO date/time; local time if no zone (default: 24 hours ago)")
    p.add_argument("--label", choices=[label.value for label in Label], type=str.upper,
                   help="cards for this label only (the summary and the rejected files stay)")
    p.add_argument("--limit", type=_parse_limit, default=500,
                   help="at most N cards, the newest (0: all; default 500)")
    p.add_argument("--out", type=Path, default=Path("review.html"),
                   help="the HTML file to write (default review.html)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrate import check_schema
    from db.results import review_rows
    from db.session import session_scope
    from worker.ops.review_page import render_review, write_page

    since = args.since or datetime.now().astimezone() - timedelta(days=1)
    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = review_rows(session, since=since)
    page = render_review(rows, settings, since=since, label=args.label, limit=args.limit or None)
    write_page(args.out, page)
    cards = page.count('<article class="card"')
    print(f"wrote {args.out}: {cards} card(s) of {len(rows)} file(s) received since "
          f"{since.isoformat(timespec='seconds')}")
    return 0
