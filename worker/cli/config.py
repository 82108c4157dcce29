"""`cxr settings`: the effective configuration, or the README's settings table."""

from __future__ import annotations

import argparse

from worker.settings import Settings, settings_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "settings",
        help="show the effective CXR_* settings (passwords hidden)",
        description="Print every setting with its current value, or the README table.",
    )
    p.add_argument("--markdown", action="store_true", help="print the documentation table")
    p.set_defaults(func=cmd_settings)


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for var, default, doc in settings_table():
            print(f"| `{var}` | `{default}` | {doc} |" if default else f"| `{var}` | | {doc} |")
        return 0
    from db.session import redacted_url

    effective = {
        "inbox": settings.inbox_dir,
        "archive": settings.archive_dir,
        "rejected": settings.rejected_dir,
        "models": settings.models_path,
        "database": redacted_url(settings.db_url),
        "broker": redacted_url(settings.broker_url),
    }
    for name in Settings.model_fields:
        if name in ("broker_url", "database_url", "flower_basic_auth"):
            continue
        effective.setdefault(name, getattr(settings, name))
    effective["flower_basic_auth"] = "(set)" if settings.flower_basic_auth else "(off)"
    width = max(map(len, effective))
    for key, value in effective.items():
        print(f"{key.ljust(width)}  {value}")
    return 0
