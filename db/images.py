"""Every query on received images and their predictions (watcher, workers, reconcile pass).

Status changes that can race with another process are conditional updates (``WHERE status
IN ...``), so a late "queued" never overwrites a worker's "processing" or "done".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, func, insert, or_, select, update
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


def current_predictions(
    session: Session, sha256s: Iterable[str], pneumonia_model_id: int,
    infection_model_id: int | None,
) -> dict[str, int]:
    """sha256 -> id of a prediction still valid for these production models, for a batch in
    one query. A NORMAL made by the same stage-1 model never ran stage 2, so it stays valid
    whatever the infection model is now."""
    shas = list(set(sha256s))
    if not shas:
        return {}
    same_models = (Prediction.infection_key == (infection_model_id or 0))
    if infection_model_id is not None:
        same_models |= Prediction.label == Label.NORMAL
    rows = session.execute(
        select(Prediction.sha256, Prediction.id, Prediction.infection_key).where(
            Prediction.sha256.in_(shas),
            Prediction.pneumonia_model_id == pneumonia_model_id,
            same_models,
        )
    )
    found: dict[str, int] = {}
    for sha, prediction_id, key in rows:
        if sha not in found or key == (infection_model_id or 0):
            found[sha] = prediction_id
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


def claim(
    session: Session, image_id: int, max_attempts: int, holder: str | None = None,
    task_id: str | None = None,
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
    image.claimed_by, image.claimed_at, image.task_id = holder, utcnow(), task_id
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


def save_predictions(session: Session, rows: list[dict]) -> list[int]:
    """Insert-or-get predictions on (sha256, pneumonia model, infection model), so a content
    is never predicted twice by the same models: one insert-or-ignore and one read for the
    batch; ids in the order given.

    Each row has ``sha256``, ``pneumonia_model_id``, ``infection_model_id``, ``p_pneumonia``,
    ``p_virus``, ``label``, ``threshold``, ``infection_threshold``, ``inference_ms`` and
    optionally ``heatmap_path``.
    """
    if not rows:
        return []
    now = utcnow()
    values = [{
        "sha256": r["sha256"],
        "pneumonia_model_id": r["pneumonia_model_id"],
        "infection_model_id": r["infection_model_id"],
        "infection_key": r["infection_model_id"] or 0,
        "p_pneumonia": float(r["p_pneumonia"]),
        "p_virus": None if r["p_virus"] is None else float(r["p_virus"]),
        "label": str(r["label"]),
        "threshold": float(r["threshold"]),
        "infection_threshold": None if r["infection_threshold"] is None
        else float(r["infection_threshold"]),
        "inference_ms": r.get("inference_ms"),
        "heatmap_path": r.get("heatmap_path"),
        "created_at": now,
    } for r in rows]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:
        raise NotImplementedError(f"prediction upsert not written for {dialect}")
    session.execute(
        upsert(Prediction.__table__).on_conflict_do_nothing(
            index_elements=["sha256", "pneumonia_model_id", "infection_key"]),
        values,
    )
    keys = {(v["sha256"], v["pneumonia_model_id"], v["infection_key"]) for v in values}
    found = {
        (row.sha256, row.pneumonia_model_id, row.infection_key): row.id
        for row in session.execute(
            select(Prediction.id, Prediction.sha256, Prediction.pneumonia_model_id,
                   Prediction.infection_key)
            .where(Prediction.sha256.in_({k[0] for k in keys}),
                   Prediction.pneumonia_model_id.in_({k[1] for k in keys}))
        )
    }
    ids = [found[(v["sha256"], v["pneumonia_model_id"], v["infection_key"])] for v in values]
    for prediction_id, v in zip(ids, values, strict=True):
        if v["heatmap_path"] is not None:  # a heatmap made now goes on a prediction without one
            session.execute(
                update(Prediction)
                .where(Prediction.id == prediction_id, Prediction.heatmap_path.is_(None))
                .values(heatmap_path=v["heatmap_path"])
                .execution_options(synchronize_session=False)
            )
    return ids


def link_predictions(session: Session, links: list[tuple[int, int]]) -> None:
    """Mark open images done with existing predictions, (image id, prediction id) pairs in one
    statement; final ones are left as they are."""
    if not links:
        return
    table = Image.__table__
    session.execute(
        update(table)
        .where(table.c.id == bindparam("image"),
               or_(*(table.c.status == status for status in OPEN_STATUSES)))
        .values(status=ImageStatus.DONE, prediction_id=bindparam("prediction"), error=None,
                finished_at=utcnow()),
        [{"image": image_id, "prediction": prediction_id} for image_id, prediction_id in links],
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


# --- claims (a delivery claims the images its message names) ----------------------------------

@dataclass(frozen=True)
class Held:
    """An image found ``processing``: someone holds it, alive or dead.

    ``holder`` is the ``host:pid`` that claimed it (None for rows claimed before claims were
    recorded) and ``since`` when; the caller decides whether to leave it or take it over.
    """

    image_id: int
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


def claim_free(
    session: Session, image_ids: Iterable[int], max_attempts: int, holder: str | None = None,
    task_id: str | None = None,
) -> tuple[list[Claim], list[Held]]:
    """Claim every listed image nobody holds, in one conditional UPDATE (race-free on both
    backends: a row another delivery took first no longer matches).

    Returns the claims (attempt counted) and the rows found ``processing`` (held by another
    delivery, alive or dead). Rows past ``max_attempts``, unknown or final are in neither:
    ``claim`` them one by one to mark them failed (it returns None for final ones).
    """
    ids = sorted(set(image_ids))
    if not ids:
        return [], []
    rows = session.execute(
        update(Image)
        .where(
            Image.id.in_(ids),
            Image.status.in_(_FREE_STATUSES),
            func.coalesce(Image.attempts, 0) < max_attempts,
        )
        .values(status=ImageStatus.PROCESSING, attempts=func.coalesce(Image.attempts, 0) + 1,
                claimed_by=holder, claimed_at=utcnow(), task_id=task_id)
        .returning(*_claim_columns())
        .execution_options(synchronize_session=False)
    ).all()
    claims = sorted((_as_claim(row) for row in rows), key=lambda c: c.image_id)
    held = [
        Held(r.id, r.claimed_by, r.claimed_at)
        for r in session.execute(
            select(Image.id, Image.claimed_by, Image.claimed_at)
            .where(Image.id.in_(ids), Image.status == ImageStatus.PROCESSING,
                   Image.id.not_in([c.image_id for c in claims]))
            .order_by(Image.id)
        )
    ]
    return claims, held


def unclaimable(session: Session, image_ids: Iterable[int]) -> list[int]:
    """Of these ids, the open rows that are neither free to claim nor held: the ones past
    their attempts, which ``claim`` turns into ``failed``."""
    return list(session.scalars(
        select(Image.id).where(
            Image.id.in_(list(image_ids)),
            Image.status.in_(_FREE_STATUSES),
        ).order_by(Image.id)
    ))


def requeue(session: Session, image_ids: Iterable[int], reason: str) -> int:
    """processing -> queued with ``reason`` noted, for images to try again later (their
    attempts stay counted)."""
    result = session.execute(
        update(Image)
        .where(Image.id.in_(list(image_ids)), Image.status == ImageStatus.PROCESSING)
        .values(status=ImageStatus.QUEUED, error=reason)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


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
