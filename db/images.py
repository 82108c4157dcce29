"""Every query on received images and their predictions (watcher, workers, reconcile pass).

Status changes that can race with another process are conditional updates (``WHERE status
IN ...``), so a late "queued" never overwrites a worker's "processing" or "done".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from db.identifiers import DicomIdentifiers
from db.models import Image, Prediction, utcnow
from db.vocabulary import FINAL_STATUSES, OPEN_STATUSES, ImageStatus


def record_image(
    session: Session,
    *,
    sha256: str,
    file_name: str,
    stored_path: str | None,
    size_bytes: int | None,
    status: ImageStatus = ImageStatus.RECEIVED,
    error: str | None = None,
) -> Image:
    """Insert one received file (flushed so it has an id)."""
    image = Image(
        sha256=sha256,
        file_name=file_name,
        stored_path=stored_path,
        size_bytes=size_bytes,
        status=status,
        error=error,
        finished_at=utcnow() if status in FINAL_STATUSES else None,
    )
    session.add(image)
    session.flush()
    return image


def record_images(session: Session, rows: list[dict]) -> list[int]:
    """Insert many received files in one statement; their ids, in the order given.

    Each row has ``sha256``, ``file_name``, ``stored_path`` and ``size_bytes``.
    """
    if not rows:
        return []
    now = utcnow()
    values = [{**row, "status": ImageStatus.RECEIVED, "attempts": 0, "received_at": now}
              for row in rows]
    result = session.execute(
        insert(Image).returning(Image.id, sort_by_parameter_order=True), values
    )
    return [row.id for row in result]


def _set_status(
    session: Session, image_id: int, status: ImageStatus, from_statuses: Iterable[str], **values
) -> bool:
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.in_(list(from_statuses)))
        .values(status=status, **values)
    )
    return result.rowcount == 1


def mark_queued_many(session: Session, image_ids: Iterable[int]) -> int:
    """received/waiting_model -> queued for every id (after a successful enqueue)."""
    result = session.execute(
        update(Image)
        .where(Image.id.in_(list(image_ids)),
               Image.status.in_((ImageStatus.RECEIVED, ImageStatus.WAITING_MODEL)))
        .values(status=ImageStatus.QUEUED)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def has_rejection(session: Session, file_name: str, reason: str) -> bool:
    """Whether this refusal (a file left in the inbox) was already recorded."""
    found = session.scalar(
        select(Image.id).where(
            Image.file_name == file_name, Image.status == ImageStatus.REJECTED,
            Image.error == reason, Image.stored_path.is_(None),
        ).limit(1)
    )
    return found is not None


def mark_waiting_model(session: Session, image_ids: Iterable[int]) -> int:
    """No production stage-1 model: park the images; the delivery does not count as an attempt."""
    result = session.execute(
        update(Image)
        .where(Image.id.in_(list(image_ids)), Image.status.in_(OPEN_STATUSES))
        .values(
            status=ImageStatus.WAITING_MODEL,
            error="no production pneumonia model",
            attempts=0,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def mark_rejected(
    session: Session, image_id: int, reason: str, stored_path: str | None = None,
    review: str | None = None, gate_score: float | None = None,
) -> bool:
    """Refuse an open image; ``review``/``gate_score`` when the input gate refused it."""
    values: dict = {"error": reason, "finished_at": utcnow()}
    if stored_path is not None:
        values["stored_path"] = stored_path
    if review is not None:
        values.update(review=review, gate_score=gate_score)
    return _set_status(session, image_id, ImageStatus.REJECTED, OPEN_STATUSES, **values)


def set_identifiers(session: Session, image_id: int, identifiers: DicomIdentifiers) -> None:
    """Store a DICOM image's identifiers (the only header values kept) on its row."""
    session.execute(
        update(Image).where(Image.id == image_id).values(**identifiers.columns())
        .execution_options(synchronize_session=False)
    )


def mark_failed(session: Session, image_id: int, reason: str) -> bool:
    return _set_status(
        session, image_id, ImageStatus.FAILED, OPEN_STATUSES, error=reason, finished_at=utcnow()
    )


def ids_to_enqueue(
    session: Session,
    *,
    received_before: datetime,
    include_waiting: bool,
    queued_before: datetime | None = None,
    claimed_before: datetime | None = None,
) -> list[tuple[int, str]]:
    """(id, file_name) of rows the reconcile pass should enqueue again.

    ``received`` rows older than ``received_before`` (their enqueue failed or was cut short);
    ``waiting_model`` rows when a production model exists; when ``queued_before`` is given
    (the caller saw the broker queue empty), ``queued`` rows older than that: their message
    was lost, e.g. by a Redis restart without persistence; and ``processing`` rows claimed
    before ``claimed_before`` (past their lease: a delivery that sees them takes them over).
    """
    condition = (Image.status == ImageStatus.RECEIVED) & (Image.received_at < received_before)
    if include_waiting:
        condition |= Image.status == ImageStatus.WAITING_MODEL
    if queued_before is not None:
        condition |= (Image.status == ImageStatus.QUEUED) & (Image.received_at < queued_before)
    if claimed_before is not None:
        condition |= (Image.status == ImageStatus.PROCESSING) & (
            Image.claimed_at < claimed_before)
    rows = session.execute(select(Image.id, Image.file_name).where(condition).order_by(Image.id))
    return [(row.id, row.file_name) for row in rows]


def waiting_ids(session: Session) -> list[tuple[int, str]]:
    """(id, file_name) of images parked for lack of a production model."""
    rows = session.execute(
        select(Image.id, Image.file_name)
        .where(Image.status == ImageStatus.WAITING_MODEL)
        .order_by(Image.id)
    )
    return [(row.id, row.file_name) for row in rows]


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


@dataclass(frozen=True)
class ImageResult:
    """An image row and its prediction, as plain values."""

    image_id: int
    sha256: str
    stored_path: str | None
    status: str
    error: str | None
    label: str | None
    p_pneumonia: float | None
    p_virus: float | None
    pneumonia_model_id: int | None
    infection_model_id: int | None
    heatmap_path: str | None


def image_results(session: Session, image_ids: Iterable[int]) -> dict[int, ImageResult]:
    """id -> the image and the prediction it is linked to (None fields when it has none)."""
    rows = session.execute(
        select(Image.id, Image.sha256, Image.stored_path, Image.status, Image.error,
               Prediction.label, Prediction.p_pneumonia, Prediction.p_virus,
               Prediction.pneumonia_model_id, Prediction.infection_model_id,
               Prediction.heatmap_path)
        .outerjoin(Prediction, Prediction.id == Image.prediction_id)
        .where(Image.id.in_(list(image_ids)))
    )
    return {row[0]: ImageResult(*row) for row in rows}
