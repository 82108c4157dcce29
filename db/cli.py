"""`cxr db upgrade`, `cxr results` and `cxr models list|show|promote|rollback`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from typing import Any

from db.models import ImageStatus, Label, Stage

DISCLAIMER = "Decision support only, not a medical device: a clinician reads every image."


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
    res.add_argument("--limit", type=int, default=50, help="at most N rows (0: all; default 50)")
    res.add_argument("--format", choices=["table", "csv", "json"], default="table")
    res.set_defaults(func=cmd_results)


def register_models(models_sub: argparse._SubParsersAction) -> None:
    stages = [s.value for s in Stage]
    ls = models_sub.add_parser("list", help="list registered model versions")
    ls.add_argument("--stage", choices=stages)
    ls.set_defaults(func=cmd_models_list)
    show = models_sub.add_parser("show", help="show one version: metrics, parameters, lineage")
    show.add_argument("stage", choices=stages)
    show.add_argument("version", type=_parse_version)
    show.set_defaults(func=cmd_models_show)
    promote = models_sub.add_parser(
        "promote",
        help="make a version the production model of its stage",
        description="Promote STAGE VERSION to production; the previous production version is "
        "archived in the same transaction. Workers switch on their next image.",
    )
    promote.add_argument("stage", choices=stages)
    promote.add_argument("version", type=_parse_version)
    promote.set_defaults(func=cmd_models_promote)
    rollback = models_sub.add_parser(
        "rollback", help="go back to the previous production version of a stage"
    )
    rollback.add_argument("stage", choices=stages)
    rollback.set_defaults(func=cmd_models_rollback)


def _parse_iso(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None


def _parse_version(value: str) -> int:
    try:
        return int(value.lower().removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {value!r}") from None


def cmd_db_upgrade(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import _redacted, current_revision, upgrade

    settings.ensure_dirs()
    upgrade(settings.db_url)
    print(f"database {_redacted(settings.db_url)} is at schema {current_revision(settings.db_url)}")
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

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = list_results(
            session,
            status=args.status,
            label=args.label,
            since=args.since,
            limit=args.limit or None,
        )
    if args.format == "json":
        json.dump(rows, sys.stdout, default=str, indent=2)
        print()
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(format_results_table(rows))
        print(f"\n{len(rows)} row(s). {DISCLAIMER}")
    return 0


def format_results_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the columns a person reads first."""
    headers = ["id", "file_name", "status", "label", "p_pneumonia", "p_virus", "models", "error"]
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
                _clip(row["file_name"], 40),
                row["status"],
                row["label"] or "",
                _prob(row["p_pneumonia"]),
                _prob(row["p_virus"]),
                models,
                _clip(row["error"] or "", 60),
            ]
        )
    return format_table(headers, lines)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def _prob(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _clip(value: str, width: int) -> str:
    value = value.replace("\n", "\\n")
    return value if len(value) <= width else value[: width - 1] + "…"


def cmd_models_list(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = registry.list_versions(session, args.stage)
        table = [
            [
                m.stage,
                f"v{m.version}",
                m.status,
                m.backbone,
                _metric(m.metrics, "auc"),
                _metric(m.metrics, "accuracy"),
                f"v{m.parent_version}" if m.parent_version else "",
                m.created_at.strftime("%Y-%m-%d %H:%M"),
            ]
            for m in rows
        ]
    headers = [
        "stage",
        "version",
        "status",
        "backbone",
        "test_auc",
        "test_acc",
        "parent",
        "created",
    ]
    print(format_table(headers, table) if table else "no models registered yet (see `cxr train`)")
    return 0


def _metric(metrics: dict[str, Any], name: str) -> str:
    value = (metrics.get("test") or metrics).get(name)
    if isinstance(value, dict):
        value = value.get("value")
    return f"{value:.3f}" if isinstance(value, int | float) else ""


def cmd_models_show(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        m = registry.get_version(session, args.stage, args.version)
        info = {
            "stage": m.stage,
            "version": m.version,
            "status": m.status,
            "backbone": m.backbone,
            "bundle": str(settings.models_path / m.bundle_path),
            "bundle_sha256": m.bundle_sha256,
            "parent_version": m.parent_version,
            "dataset_fingerprint": m.dataset_fingerprint,
            "code_version": m.code_version,
            "created_at": m.created_at.isoformat(),
            "promoted_at": m.promoted_at.isoformat() if m.promoted_at else None,
            "params": m.params,
            "metrics": m.metrics,
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_models_promote(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)

    def txn() -> str:
        with session_scope(settings.db_url) as session:
            return registry.promote(session, args.stage, args.version).name

    name = registry.with_retries(txn)
    print(f"{name} is now in production")
    _requeue_waiting(settings)
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)

    def txn() -> str:
        with session_scope(settings.db_url) as session:
            return registry.rollback(session, args.stage).name

    name = registry.with_retries(txn)
    print(f"rolled back: {name} is now in production")
    _requeue_waiting(settings)
    return 0


def _requeue_waiting(settings: Any) -> None:
    """Images parked as waiting_model go back to the queue now, not at the next reconcile."""
    try:
        from worker.intake import requeue_waiting
    except ImportError:
        return
    try:
        n = requeue_waiting(settings)
    except Exception as exc:  # the broker may be down; the watcher's reconcile pass retries
        print(f"note: could not re-queue waiting images now ({exc}); the watcher will")
        return
    if n:
        print(f"re-queued {n} image(s) that were waiting for a model")
