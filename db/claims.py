"""The claim protocol's queries: a delivery claims the images its message names.

One conditional UPDATE claims every free image (attempts counted and committed before
inference, so an image that keeps killing its worker ends ``failed``); rows found
``processing`` come back as ``Held`` for the worker to judge (``worker.classify.claiming``
decides whether their holder is gone); ``claim`` takes one over; ``requeue`` hands one back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Image, utcnow
from db.vocabulary import FINAL_STATUSES, ImageStatus


@dataclass(frozen=True)
class Claim:
    """What a worker needs after claiming an image (plain values, safe after the session)."""

    image_id: int
    sha256: str
    file_name: str
    stored_path: str | None
    attempts: int
    gave_up: bool


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
