"""Alembic, driven from code: upgrade, downgrade, and the schema-behind guard.

Every command that touches the database calls ``check_schema`` first (``ensure_schema`` for
the ones that create things, which also set up a brand-new database), so an old database
fails with the command that fixes it instead of a confusing SQL error later.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.exceptions import SchemaBehindError
from db.session import get_engine, redacted_url

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def is_fresh(url: str) -> bool:
    """True for a database that has never been migrated (safe to upgrade without asking)."""
    return current_revision(url) is None


def ensure_schema(url: str) -> bool:
    """Check the schema; a brand-new database is upgraded automatically. True if upgraded.

    Commands that create things (``cxr up``, ``cxr train``, ``cxr models import``) start from
    an empty data dir without a separate step; an old schema still refuses, naming the fix.
    """
    try:
        check_schema(url)
        return False
    except SchemaBehindError:
        if not is_fresh(url):
            raise
    upgrade(url)
    return True


def check_schema(url: str) -> None:
    """Raise SchemaBehindError, naming the fix, unless the database is at this code's head."""
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    where = redacted_url(url)
    if current is None:
        raise SchemaBehindError(
            f"the database at {where} has no cxr-triage schema yet. Run: cxr db upgrade"
        )
    raise SchemaBehindError(
        f"the database at {where} is at schema {current}, this code needs {head}. "
        "Run: cxr db upgrade"
    )
