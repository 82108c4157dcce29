"""Shared fixtures: databases on both backends, isolated per test.

Every database test runs on SQLite and, when ``CXR_TEST_POSTGRES_URL`` is set (``.ci/run``
sets it and refuses to start without PostgreSQL), on PostgreSQL too. Each PostgreSQL test gets
its own schema through ``search_path`` so concurrent runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

POSTGRES_URL = os.environ.get("CXR_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


def _postgres_schema_url(schema: str) -> str:
    assert POSTGRES_URL
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=BACKENDS)
def empty_db_url(request, tmp_path) -> Iterator[str]:
    """A URL to an empty database (no schema) on each backend."""
    from db.session import dispose_engines

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cxr.db'}"
        dispose_engines()
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _postgres_schema_url(schema)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A database migrated to head, on each backend."""
    from db.migrate import upgrade

    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def backend(db_url: str) -> str:
    return "postgresql" if db_url.startswith("postgresql") else "sqlite"
