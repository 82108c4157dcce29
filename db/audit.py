"""The audit trail: who changed what the service answers with, and why.

Promote, rollback, shadow on and off, import and re-score each add a row in the same
transaction as the change itself, so a change is never made without its record.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEntry


@dataclass(frozen=True)
class AuditRecord:
    id: int
    action: str
    stage: str | None
    version: int | None
    detail: dict[str, Any]
    actor: str
    reason: str | None
    created_at: datetime


def os_user() -> str:
    """The OS user running the command (who made the change when ``--by`` is not given)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (containers)
        import os

        return f"uid {os.getuid()}"


def record(session: Session, action: str, *, stage: str | None = None,
           version: int | None = None, detail: dict[str, Any] | None = None,
           actor: str | None = None, reason: str | None = None) -> None:
    """Add one audit row (flushed with the caller's transaction)."""
    session.add(AuditEntry(action=action, stage=stage, version=version, detail=detail or {},
                           actor=(actor or os_user())[:255], reason=reason))
    session.flush()


def history(session: Session, stage: str | None = None, limit: int | None = None
            ) -> list[AuditRecord]:
    """Audit rows, newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc())
    if stage is not None:
        query = query.where(AuditEntry.stage == stage)
    if limit:
        query = query.limit(limit)
    return [AuditRecord(r.id, r.action, r.stage, r.version, dict(r.detail or {}), r.actor,
                        r.reason, r.created_at) for r in session.scalars(query)]
