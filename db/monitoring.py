"""The queries behind `cxr monitor`: which versions served, their labelled predictions, and
what was served day by day. Plain dicts out; the statistics are made above this floor.

Every prediction counts, shadow ones included (an image may have several): a version is
measured on the images it scored, whether or not its answer was the one shown.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import func, inspect, or_, select, text
from sqlalchemy.orm import Session

from db.models import GroundTruth, Image, ModelVersion, Prediction


def as_utc(when: datetime | None) -> datetime | None:
    """An aware UTC time (SQLite hands back naive ones, stored as UTC)."""
    if when is None:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def served_versions(session: Session) -> list[dict[str, Any]]:
    """Every model version with at least one prediction: id, name, stage, status, metrics."""
    used = or_(ModelVersion.id.in_(select(Prediction.pneumonia_model_id)),
               ModelVersion.id.in_(select(Prediction.infection_model_id)))
    rows = session.scalars(select(ModelVersion).where(used)
                           .order_by(ModelVersion.stage.desc(), ModelVersion.version))
    return [{"id": m.id, "name": m.name, "stage": m.stage, "version": m.version,
             "status": m.status, "metrics": dict(m.metrics or {})} for m in rows]


def labelled_predictions(session: Session) -> list[dict[str, Any]]:
    """One dict per (labelled image, prediction of its content): the current truth, when the
    image came, which versions answered what."""
    newest = select(func.max(GroundTruth.id)).group_by(GroundTruth.image_id)
    query = (
        select(Image.id, GroundTruth.label, Image.received_at, Prediction.pneumonia_model_id,
               Prediction.infection_model_id, Prediction.p_pneumonia, Prediction.p_virus,
               Prediction.label)
        .join(GroundTruth, GroundTruth.image_id == Image.id)
        .join(Prediction, Prediction.sha256 == Image.sha256)
        .where(GroundTruth.id.in_(newest))
        .order_by(Image.id, Prediction.id)
    )
    keys = ("image_id", "truth", "received_at", "pneumonia_model_id", "infection_model_id",
            "p_pneumonia", "p_virus", "predicted")
    rows = [dict(zip(keys, row, strict=True)) for row in session.execute(query)]
    for row in rows:
        row["received_at"] = as_utc(row["received_at"])
    return rows


def received_since(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Every image received since ``since``: day, status, shown label and the input mix
    (format from the archived name, size, DICOM modality and view, the input gate's score);
    no names, no patient data."""
    query = (select(Image.id, Image.received_at, Image.status, Prediction.label,
                    Image.stored_path, Image.size_bytes, Image.modality, Image.view_position,
                    func.coalesce(Prediction.gate_score, Image.gate_score))
             .outerjoin(Prediction, Prediction.id == Image.prediction_id)
             .where(Image.received_at >= since).order_by(Image.id))
    out = []
    for (image_id, received, status, label, stored, size, modality, view,
         gate) in session.execute(query):
        suffix = PurePosixPath(stored).suffix.lower().lstrip(".") if stored else ""
        out.append({"id": image_id, "received_at": as_utc(received), "status": status,
                    "label": label,
                    "format": suffix or "unknown", "size_bytes": size, "modality": modality,
                    "view_position": view, "gate_score": gate})
    return out


def predictions_since(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Every prediction made since ``since`` (shadow ones too): when, which versions, the
    probabilities."""
    query = (select(Prediction.created_at, Prediction.pneumonia_model_id, Prediction.p_pneumonia,
                    Prediction.infection_model_id, Prediction.p_virus)
             .where(Prediction.created_at >= since).order_by(Prediction.id))
    keys = ("created_at", "pneumonia_model_id", "p_pneumonia", "infection_model_id", "p_virus")
    rows = [dict(zip(keys, row, strict=True)) for row in session.execute(query)]
    for row in rows:
        row["created_at"] = as_utc(row["created_at"])
    return rows


def first_served(session: Session, model_id: int, stage: str, limit_days: int = 7
                 ) -> list[float]:
    """The probabilities version ``model_id`` gave in its first ``limit_days`` days of serving:
    the drift reference of a version whose bundle stored none."""
    pneumonia = stage == "pneumonia"
    column = Prediction.p_pneumonia if pneumonia else Prediction.p_virus
    owner = Prediction.pneumonia_model_id if pneumonia else Prediction.infection_model_id
    start = session.scalar(select(func.min(Prediction.created_at)).where(owner == model_id))
    if start is None:
        return []
    end = start + timedelta(days=limit_days)
    rows = session.scalars(select(column).where(owner == model_id, column.is_not(None),
                                                Prediction.created_at < end))
    return [float(v) for v in rows]


def review_flags(session: Session) -> dict[int, str | None] | None:
    """image id -> its results row's ``review`` flag, or None when the ``results`` view has no
    ``review`` column (a schema before review flags)."""
    columns = {c["name"] for c in inspect(session.connection()).get_columns("results")}
    if "review" not in columns:
        return None
    rows = session.execute(text("SELECT id, review FROM results WHERE status = 'done'"))
    return {int(i): (flag or None) for i, flag in rows}


def received_times(session: Session, image_ids: list[int]) -> dict[int, datetime]:
    """image id -> when it was received: the start of its drop-to-done latency."""
    if not image_ids:
        return {}
    rows = session.execute(select(Image.id, Image.received_at).where(Image.id.in_(image_ids)))
    return {int(i): as_utc(when) for i, when in rows}


def queue_state(session: Session) -> tuple[dict[str, int], datetime | None]:
    """(open images per status, when the oldest open one was received): the queue as
    operations see it, read at scrape time."""
    from db.vocabulary import OPEN_STATUSES

    counts = dict.fromkeys((str(s) for s in OPEN_STATUSES), 0)
    rows = session.execute(select(Image.status, func.count(), func.min(Image.received_at))
                           .where(Image.status.in_(OPEN_STATUSES)).group_by(Image.status))
    oldest = None
    for status, count, first in rows:
        counts[str(status)] = int(count)
        oldest = first if oldest is None or (first is not None and first < oldest) else oldest
    return counts, as_utc(oldest)


def final_rows(session: Session, image_ids: list[int]) -> list[tuple[str, str | None,
                                                                 int | None, str | None]]:
    """(status, label, pneumonia model version, error) of each of ``image_ids``: what the
    watcher counts for the images intake finished itself (a known content linked, a refusal)."""
    if not image_ids:
        return []
    query = (select(Image.status, Prediction.label, ModelVersion.version, Image.error)
             .outerjoin(Prediction, Prediction.id == Image.prediction_id)
             .outerjoin(ModelVersion, ModelVersion.id == Prediction.pneumonia_model_id)
             .where(Image.id.in_(image_ids)))
    return [tuple(row) for row in session.execute(query)]
