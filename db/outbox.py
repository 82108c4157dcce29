"""The DICOM outbox: which finished images still owe a DICOM result, what is due, and how each
try went. The sender (worker/dicom/sender.py) is the only writer; `cxr dicom outbox` reads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import and_, exists, select, text, update
from sqlalchemy.orm import Session

from db.models import DicomOutbox, Image, Prediction, utcnow
from db.vocabulary import ImageStatus

REPORTED_STATUSES = (ImageStatus.DONE, ImageStatus.REJECTED)
"""Statuses that get a result object: a label, or a refusal with its reason."""
ERROR_LENGTH = 500


@dataclass(frozen=True)
class OutboxItem:
    id: int
    image_id: int
    kind: str
    destination: str
    sop_instance_uid: str
    attempts: int


def fill_outbox(session: Session, destinations: Sequence[str], kinds: Sequence[str],
                dicom_only: bool = True, limit: int = 500) -> int:
    """Add a row per (finished image, kind, destination) that has none yet; how many.
    ``kinds``: ``sr`` (the result), ``sc`` (the heatmap, for images that have one)."""
    added = 0
    for destination in destinations:
        for kind in kinds:
            missing = ~exists().where(and_(DicomOutbox.image_id == Image.id,
                                           DicomOutbox.kind == kind,
                                           DicomOutbox.destination == destination))
            query = select(Image.id).where(Image.status.in_(REPORTED_STATUSES), missing)
            if dicom_only:
                query = query.where(Image.sop_instance_uid.is_not(None))
            if kind == "sc":  # a heatmap picture only where the worker drew one
                query = query.where(Image.prediction_id.in_(
                    select(Prediction.id).where(Prediction.heatmap_path.is_not(None))))
            ids = session.scalars(query.order_by(Image.id).limit(limit)).all()
            session.add_all(DicomOutbox(image_id=i, kind=kind, destination=destination,
                                        sop_instance_uid=generate_uid(), attempts=0)
                            for i in ids)
            added += len(ids)
    session.flush()
    return added


def due_items(session: Session, destinations: Sequence[str], now: datetime | None = None,
              limit: int = 64) -> list[OutboxItem]:
    """Unsent rows for ``destinations`` whose next try has come, oldest first."""
    now = now or utcnow()
    rows = session.scalars(
        select(DicomOutbox).where(DicomOutbox.sent_at.is_(None), DicomOutbox.next_try_at <= now,
                                  DicomOutbox.destination.in_(list(destinations)))
        .order_by(DicomOutbox.id).limit(limit)
    ).all()
    return [OutboxItem(r.id, r.image_id, r.kind, r.destination, r.sop_instance_uid, r.attempts)
            for r in rows]


def mark_sent(session: Session, ids: Iterable[int]) -> None:
    session.execute(update(DicomOutbox).where(DicomOutbox.id.in_(list(ids)))
                    .values(sent_at=utcnow(), last_error=None,
                            attempts=DicomOutbox.attempts + 1))


def mark_failed(session: Session, ids: Iterable[int], error: str, retry_in: float) -> None:
    """One more failed try for each row: the reason, and when to try again."""
    session.execute(update(DicomOutbox).where(DicomOutbox.id.in_(list(ids)))
                    .values(last_error=error[:ERROR_LENGTH], attempts=DicomOutbox.attempts + 1,
                            next_try_at=utcnow() + timedelta(seconds=retry_in)))


def result_for(session: Session, image_id: int) -> dict[str, Any] | None:
    """The ``results`` row of one image, with where its file is kept (``stored_path``)."""
    row = session.execute(
        text("SELECT r.*, i.stored_path AS stored_path FROM results r JOIN images i "
             "ON i.id = r.id WHERE r.id = :id"), {"id": image_id}).mappings().first()
    return dict(row) if row else None


def outbox_rows(session: Session, state: str | None = None, limit: int = 50) -> list[dict]:
    """Rows newest first with their state: ``sent``, ``failing`` (tried, not yet sent) or
    ``pending`` (not tried yet)."""
    query = select(DicomOutbox).order_by(DicomOutbox.id.desc()).limit(limit)
    if state == "sent":
        query = query.where(DicomOutbox.sent_at.is_not(None))
    elif state == "failing":
        query = query.where(DicomOutbox.sent_at.is_(None), DicomOutbox.attempts > 0)
    elif state == "pending":
        query = query.where(DicomOutbox.sent_at.is_(None), DicomOutbox.attempts == 0)
    out = []
    for r in session.scalars(query):
        st = "sent" if r.sent_at else ("failing" if r.attempts else "pending")
        out.append({"id": r.id, "image_id": r.image_id, "kind": r.kind,
                    "destination": r.destination, "state": st, "attempts": r.attempts,
                    "next_try_at": None if r.sent_at else _iso(r.next_try_at),
                    "sent_at": _iso(r.sent_at), "last_error": r.last_error})
    return out


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds")
