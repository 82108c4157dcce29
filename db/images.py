"""Every query on received images and their predictions (watcher, workers, reconcile pass).

Status changes that can race with another process are conditional updates (``WHERE status
IN ...``), so a late "queued" never overwrites a worker's "processing" or "done".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.identifiers import DicomIdentifiers
from db.models import Image, Prediction, utcnow
from db.vocabulary import FINAL_STATUSES, OPEN_STATUSES, ImageStatus, Label


@dataclass(frozen=True)
class Claim:
    """What a worker needs after claiming an image (plain values, safe after the session)."""

    image_id: int
    sha256: str
    file_name: str
    stored_path: str | None
    attempts: int
    gave_up: bool


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


def has_image(session: Session, sha256: str, file_name: str, stored_path: str) -> bool:
    """Whether this file (content, name and place) already has a row."""
    found = session.scalar(
        select(Image.id).where(
            Image.sha256 == sha256, Image.file_name == file_name, Image.stored_path == stored_path
        ).limit(1)
    )
    return found is not None


def find_prediction(
    session: Session, sha256: str, pneumonia_model_id: int, infection_model_id: int | None
) -> Prediction | None:
    """The prediction these exact models already made for this content, if any."""
    return session.scalars(
        select(Prediction).where(
            Prediction.sha256 == sha256,
            Prediction.pneumonia_model_id == pneumonia_model_id,
            Prediction.infection_key == (infection_model_id or 0),
        )
    ).first()


def find_current_prediction(
    session: Session, sha256: str, pneumonia_model_id: int, infection_model_id: int | None
) -> Prediction | None:
    """A prediction still valid for these production models.

    A NORMAL made by the same stage-1 model never ran stage 2, so it stays valid whatever the
    infection model is now.
    """
    found = find_prediction(session, sha256, pneumonia_model_id, infection_model_id)
    if found is None and infection_model_id is not None:
        found = session.scalars(
            select(Prediction).where(
                Prediction.sha256 == sha256,
                Prediction.pneumonia_model_id == pneumonia_model_id,
                Prediction.label == Label.NORMAL,
            )
        ).first()
    return found


def link_prediction(session: Session, image_id: int, prediction_id: int) -> bool:
    """Mark an open image done with an existing prediction; False if it was already final."""
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.in_(OPEN_STATUSES))
        .values(
            status=ImageStatus.DONE, prediction_id=prediction_id, error=None, finished_at=utcnow()
        )
    )
    return result.rowcount == 1


def _set_status(
    session: Session, image_id: int, status: ImageStatus, from_statuses: Iterable[str], **values
) -> bool:
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.in_(list(from_statuses)))
        .values(status=status, **values)
    )
    return result.rowcount == 1


def mark_queued(session: Session, image_id: int) -> bool:
    """received/waiting_model -> queued (after a successful enqueue)."""
    return _set_status(
        session,
        image_id,
        ImageStatus.QUEUED,
        (ImageStatus.RECEIVED, ImageStatus.WAITING_MODEL),
    )


def claim(
    session: Session, image_id: int, max_attempts: int, holder: str | None = None
) -> Claim | None:
    """Count one delivery and mark the image processing (or failed past ``max_attempts``),
    whoever held it before: the caller has decided to take it over.

    None when the image is unknown or already final: a redelivered task is then a no-op.
    The caller commits before inference so a delivery that kills the worker still counts.
    """
    image = session.get(Image, image_id, with_for_update=True)
    if image is None or image.status in FINAL_STATUSES:
        return None
    image.attempts = (image.attempts or 0) + 1
    image.claimed_by, image.claimed_at = holder, utcnow()
    gave_up = image.attempts > max_attempts
    if gave_up:
        image.status = ImageStatus.FAILED
        image.error = f"gave up after {max_attempts} attempts (each one crashed or errored)"
        image.finished_at = utcnow()
    else:
        image.status = ImageStatus.PROCESSING
    session.flush()
    return Claim(
        image.id, image.sha256, image.file_name, image.stored_path, image.attempts, gave_up
    )


def mark_waiting_model(session: Session, image_id: int) -> bool:
    """No production stage-1 model: park the image; the delivery does not count as an attempt."""
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.in_(OPEN_STATUSES))
        .values(
            status=ImageStatus.WAITING_MODEL,
            error="no production pneumonia model",
            attempts=0,
        )
    )
    return result.rowcount == 1


def mark_rejected(
    session: Session, image_id: int, reason: str, stored_path: str | None = None
) -> bool:
    values: dict = {"error": reason, "finished_at": utcnow()}
    if stored_path is not None:
        values["stored_path"] = stored_path
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


def save_prediction(
    session: Session,
    *,
    sha256: str,
    pneumonia_model_id: int,
    infection_model_id: int | None,
    p_pneumonia: float,
    p_virus: float | None,
    label: str,
    threshold: float,
    infection_threshold: float | None,
    inference_ms: float | None = None,
) -> Prediction:
    """Insert-or-get on (sha256, pneumonia model, infection model): never writes twice."""
    values = {
        "sha256": sha256,
        "pneumonia_model_id": pneumonia_model_id,
        "infection_model_id": infection_model_id,
        "infection_key": infection_model_id or 0,
        "p_pneumonia": float(p_pneumonia),
        "p_virus": None if p_virus is None else float(p_virus),
        "label": str(label),
        "threshold": float(threshold),
        "infection_threshold": None if infection_threshold is None else float(infection_threshold),
        "inference_ms": inference_ms,
        "created_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"prediction upsert not written for {dialect}")
    session.execute(
        insert(Prediction)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["sha256", "pneumonia_model_id", "infection_key"])
    )
    prediction = find_prediction(session, sha256, pneumonia_model_id, infection_model_id)
    assert prediction is not None
    return prediction


def ids_to_enqueue(
    session: Session,
    *,
    received_before: datetime,
    include_waiting: bool,
    queued_before: datetime | None = None,
) -> list[tuple[int, str]]:
    """(id, file_name) of rows the reconcile pass should enqueue again.

    ``received`` rows older than ``received_before`` (their enqueue failed or was cut short);
    ``waiting_model`` rows when a production model exists; and, when ``queued_before`` is
    given (the caller saw the broker queue empty), ``queued`` rows older than that: their
    message was lost, e.g. by a Redis restart without persistence.
    """
    condition = (Image.status == ImageStatus.RECEIVED) & (Image.received_at < received_before)
    if include_waiting:
        condition |= Image.status == ImageStatus.WAITING_MODEL
    if queued_before is not None:
        condition |= (Image.status == ImageStatus.QUEUED) & (Image.received_at < queued_before)
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


# --- batch claims (the worker classifies waiting images in batches) ---------------------------

@dataclass(frozen=True)
class Held:
    """``claim_free``'s answer when the row is ``processing``: someone holds it, alive or dead.

    ``holder`` is the ``host:pid`` that claimed it (None for rows claimed before claims were
    recorded) and ``since`` when; the caller decides whether to wait or take the row over.
    """

    holder: str | None
    since: datetime | None

    def age_seconds(self) -> float | None:
        """Seconds since the claim (SQLite hands back naive UTC datetimes)."""
        if self.since is None:
            return None
        since = self.since if self.since.tzinfo else self.since.replace(tzinfo=UTC)
        return (utcnow() - since).total_seconds()

_FREE_STATUSES = (ImageStatus.RECEIVED, ImageStatus.QUEUED, ImageStatus.WAITING_MODEL)


def _claim_columns():
    return (Image.id, Image.sha256, Image.file_name, Image.stored_path, Image.attempts)


def _as_claim(row) -> Claim:
    return Claim(row.id, row.sha256, row.file_name, row.stored_path, row.attempts, False)


def status_of(session: Session, image_id: int) -> str | None:
    """The row's status (None when unknown): one cheap read, e.g. for a redelivered no-op."""
    return session.scalar(select(Image.status).where(Image.id == image_id))


def claim_free(
    session: Session, image_id: int, max_attempts: int, holder: str | None = None
) -> Claim | Held | None:
    """Claim an image nobody holds, in one conditional UPDATE (race-free on both backends).

    Returns the Claim; ``Held`` when the row is ``processing`` (another delivery's batch has
    it, or had it and died: the caller decides when to take it over with ``claim``); None when
    unknown or final; a ``gave_up`` Claim past ``max_attempts`` (via ``claim``).
    """
    row = session.execute(
        update(Image)
        .where(
            Image.id == image_id,
            Image.status.in_(_FREE_STATUSES),
            func.coalesce(Image.attempts, 0) < max_attempts,
        )
        .values(status=ImageStatus.PROCESSING, attempts=func.coalesce(Image.attempts, 0) + 1,
                claimed_by=holder, claimed_at=utcnow())
        .returning(*_claim_columns())
        .execution_options(synchronize_session=False)
    ).first()
    if row is not None:
        return _as_claim(row)
    held = session.execute(
        select(Image.claimed_by, Image.claimed_at)
        .where(Image.id == image_id, Image.status == ImageStatus.PROCESSING)
    ).first()
    if held is not None:
        return Held(held.claimed_by, held.claimed_at)
    return claim(session, image_id, max_attempts, holder)


def claim_queued(
    session: Session, limit: int, exclude: Iterable[int] = (), holder: str | None = None
) -> list[Claim]:
    """Claim up to ``limit`` other ``queued`` images never tried before, oldest first.

    Pick the ids, then ``UPDATE ... WHERE id IN (...) AND status = 'queued'`` counting the
    attempt: only rows still queued are taken, whoever ran first. On PostgreSQL the pick is
    ``FOR UPDATE SKIP LOCKED``, so concurrent workers take disjoint rows without waiting (as a
    separate statement: inside the UPDATE the planner may re-run it and exceed the limit);
    SQLite has a single writer. Rows already tried (attempts > 0) are left to their own task,
    which runs them alone: an image that crashed a worker never takes a batch of others down
    with it twice.
    """
    if limit <= 0:
        return []
    pick = (
        select(Image.id)
        .where(
            Image.status == ImageStatus.QUEUED,
            func.coalesce(Image.attempts, 0) == 0,
            Image.id.not_in(list(exclude)),
        )
        .order_by(Image.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    ids = list(session.scalars(pick))
    if not ids:
        return []
    rows = session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.status == ImageStatus.QUEUED)
        .values(status=ImageStatus.PROCESSING, attempts=func.coalesce(Image.attempts, 0) + 1,
                claimed_by=holder, claimed_at=utcnow())
        .returning(*_claim_columns())
        .execution_options(synchronize_session=False)
    ).all()
    return sorted((_as_claim(row) for row in rows), key=lambda c: c.image_id)


def release(session: Session, image_ids: Iterable[int]) -> int:
    """Hand batch-claimed rows back (processing -> queued) after a batch failed; attempts stay."""
    ids = list(image_ids)
    if not ids:
        return 0
    result = session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.status == ImageStatus.PROCESSING)
        .values(status=ImageStatus.QUEUED)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
