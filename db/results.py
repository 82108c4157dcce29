"""Reading the ``results`` view: what `cxr results` and the demo print."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.orm import Session

from db.identifiers import DICOM_KEYWORDS

RESULT_COLUMNS = (
    "id",
    "file_name",
    "sha256",
    "status",
    "label",
    "p_pneumonia",
    "p_virus",
    "pneumonia_model",
    "infection_model",
    "received_at",
    "finished_at",
    "error",
    *DICOM_KEYWORDS,
    "heatmap_path",
    "gate_score",
    "review",
)


def review_rows(session: Session, *, since: datetime) -> list[dict[str, Any]]:
    """Rows of the ``results`` view received since ``since``, oldest first, with each file's
    place in the data dir (``stored_path``): what `cxr report` shows."""
    columns = ", ".join(f"r.{name}" for name in RESULT_COLUMNS)
    query = text(
        f"SELECT {columns}, i.stored_path AS stored_path FROM results r "
        "JOIN images i ON i.id = r.id WHERE r.received_at >= :since ORDER BY r.id"
    ).bindparams(bindparam("since", type_=DateTime(timezone=True)))
    return [dict(row._mapping) for row in session.execute(query, {"since": since.astimezone(UTC)})]


def list_results(
    session: Session,
    *,
    status: str | None = None,
    label: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    review: bool = False,
) -> list[dict[str, Any]]:
    """Rows of the ``results`` view, newest first, filtered as the CLI asks; ``review``: only
    those a person must look at (``uncertain:<stage>`` or ``out_of_scope``)."""
    where, params = [], {}
    if review:
        where.append("review IS NOT NULL")
    if status:
        where.append("status = :status")
        params["status"] = status
    if label:
        where.append("label = :label")
        params["label"] = label.upper()
    if since:
        where.append("received_at >= :since")
        params["since"] = since.astimezone(UTC)
    sql = f"SELECT {', '.join(RESULT_COLUMNS)} FROM results"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit:
        sql += " LIMIT :limit"
        params["limit"] = limit
    query = text(sql)
    if since:
        query = query.bindparams(bindparam("since", type_=DateTime(timezone=True)))
    return [dict(row._mapping) for row in session.execute(query, params)]
