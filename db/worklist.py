"""The review app's queries: a paged, filtered worklist on the ``results`` view, one image's
detail, its earlier predictions and its labels.

Pages are keyset pages (``id < before`` newest first), never OFFSET, so page 2,000 of a
hundred thousand rows costs what page 1 does. Columns that a later migration adds to the view
(the review flag and gate score) are read when the view has them and left out otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import DateTime, bindparam, select, text
from sqlalchemy.orm import Session

from db.models import GroundTruth, Image, ModelVersion, Prediction

BASE_COLUMNS = ("id", "file_name", "status", "label", "p_pneumonia", "p_virus",
                "pneumonia_model", "infection_model", "received_at", "finished_at", "error",
                "accession_number", "study_instance_uid")
OPTIONAL_COLUMNS = ("review", "gate_score")
"""Columns of the abstain migration's view: shown when present."""
DETAIL_COLUMNS = ("sha256", "series_instance_uid", "sop_instance_uid", "modality",
                  "view_position", "heatmap_path", "threshold")
PAGE_SIZE = 50
CHUNK = 1000


@dataclass(frozen=True)
class Filters:
    """What the worklist shows; every field optional. ``version`` matches either stage."""

    status: str | None = None
    label: str | None = None
    review: str | None = None
    since: date | None = None
    until: date | None = None
    version: int | None = None

    def where(self, optional: set[str]) -> tuple[list[str], dict[str, Any]]:
        """SQL conditions and their parameters (values are always bound, never formatted)."""
        where, params = [], {}
        for name in ("status", "label"):
            if getattr(self, name):
                where.append(f"{name} = :{name}")
                params[name] = getattr(self, name)
        if self.review and "review" in optional:
            if self.review == "none":
                where.append("(review IS NULL OR review = '')")
            else:
                where.append("review = :review")
                params["review"] = self.review
        if self.since:
            where.append("received_at >= :since")
            params["since"] = datetime.combine(self.since, time(), UTC)
        if self.until:
            where.append("received_at < :until")
            params["until"] = datetime.combine(self.until + timedelta(days=1), time(), UTC)
        if self.version is not None:
            where.append("(pneumonia_model = :version OR infection_model = :version)")
            params["version"] = self.version
        return where, params


def view_columns(session: Session) -> set[str]:
    """The columns the ``results`` view has in this database."""
    return set(session.execute(text("SELECT * FROM results WHERE 1 = 0")).keys())


def _query(session: Session, filters: Filters, extra: list[str], params: dict[str, Any],
           order: str, limit: int, columns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    present = view_columns(session)
    wanted = [*BASE_COLUMNS, *columns, *(c for c in OPTIONAL_COLUMNS if c in present)]
    where, bound = filters.where(present)
    where += extra
    sql = f"SELECT {', '.join(wanted)} FROM results"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY id {order} LIMIT :limit"
    query = text(sql)
    for name in ("since", "until"):
        if name in bound:
            query = query.bindparams(bindparam(name, type_=DateTime(timezone=True)))
    rows = [dict(r._mapping) for r in session.execute(query, {**bound, **params,
                                                              "limit": limit})]
    return _with_truth(session, rows)


def _with_truth(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from db.labels import current_labels

    truth = current_labels(session, [r["id"] for r in rows]) if rows else {}
    for row in rows:
        row["truth"] = truth.get(row["id"])
    return rows


def worklist(session: Session, filters: Filters, before: int | None = None,
             limit: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """One page, newest first: rows with ids below ``before`` (the first page when None)."""
    extra, params = [], {}
    if before is not None:
        extra.append("id < :before")
        params["before"] = int(before)
    return _query(session, filters, extra, params, "DESC", max(1, min(limit, CHUNK)))


def newer(session: Session, filters: Filters, after: int, limit: int = PAGE_SIZE
          ) -> list[dict[str, Any]]:
    """Rows newer than ``after`` (what arrived since a page was drawn), newest first."""
    rows = _query(session, filters, ["id > :after"], {"after": int(after)}, "ASC", limit)
    return rows[::-1]


def by_ids(session: Session, ids: list[int]) -> list[dict[str, Any]]:
    """The worklist rows of these ids (a page refreshing the rows it shows)."""
    wanted = sorted({int(i) for i in ids})[:CHUNK]
    if not wanted:
        return []
    marks = ", ".join(f":i{n}" for n in range(len(wanted)))
    return _query(session, Filters(), [f"id IN ({marks})"],
                  {f"i{n}": v for n, v in enumerate(wanted)}, "DESC", CHUNK)


def iter_worklist(session: Session, filters: Filters) -> Iterator[dict[str, Any]]:
    """Every filtered row, newest first, read a keyset chunk at a time (the CSV download)."""
    before = None
    while True:
        rows = worklist(session, filters, before, CHUNK)
        yield from rows
        if len(rows) < CHUNK:
            return
        before = rows[-1]["id"]


def image_detail(session: Session, image_id: int) -> dict[str, Any] | None:
    """One image's results row with its identifiers, thresholds and archive place."""
    rows = _query(session, Filters(), ["id = :image_id"], {"image_id": int(image_id)},
                  "DESC", 1, DETAIL_COLUMNS)
    if not rows:
        return None
    row = rows[0]
    image = session.get(Image, int(image_id))
    row["stored_path"] = image.stored_path
    row["prediction_id"] = image.prediction_id
    prediction = session.get(Prediction, image.prediction_id) if image.prediction_id else None
    row["infection_threshold"] = prediction.infection_threshold if prediction else None
    row["pneumonia_model_id"] = prediction.pneumonia_model_id if prediction else None
    return row


def neighbours(session: Session, image_id: int) -> tuple[int | None, int | None]:
    """(the next newer image's id, the next older one's): the image page's k and j."""
    newer_id = session.scalar(select(Image.id).where(Image.id > image_id)
                              .order_by(Image.id).limit(1))
    older_id = session.scalar(select(Image.id).where(Image.id < image_id)
                              .order_by(Image.id.desc()).limit(1))
    return newer_id, older_id


def predictions_of(session: Session, image_id: int) -> list[dict[str, Any]]:
    """Every prediction of this image's content (production, shadow, re-scores), newest first."""
    image = session.get(Image, int(image_id))
    if image is None:
        return []
    query = select(Prediction).where(Prediction.sha256 == image.sha256).order_by(
        Prediction.id.desc())
    names = {m.id: m.name for m in session.scalars(select(ModelVersion))}
    return [{"id": p.id, "label": p.label, "p_pneumonia": p.p_pneumonia, "p_virus": p.p_virus,
             "pneumonia_model": names.get(p.pneumonia_model_id),
             "infection_model": names.get(p.infection_model_id),
             "created_at": p.created_at, "current": p.id == image.prediction_id}
            for p in session.scalars(query)]


def labels_of(session: Session, image_id: int) -> list[dict[str, Any]]:
    """Every label given to this image, newest first (the first one is current)."""
    query = select(GroundTruth).where(GroundTruth.image_id == int(image_id)).order_by(
        GroundTruth.id.desc())
    return [{"label": g.label, "source": g.source, "by": g.labelled_by,
             "created_at": g.created_at} for g in session.scalars(query)]
