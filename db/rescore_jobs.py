"""Re-score jobs: past images classified again by today's production versions.

A job is a row (its filters, the target versions, a cursor and the images skipped), so a
killed `cxr rescore` resumes where it was. Which images are left is a query, not a list held
in memory: an image is done once the prediction its row shows is one the target versions
made, however it got there (a re-score, a live delivery, a copy already predicted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, not_, or_, select, update
from sqlalchemy.orm import Session

from db.claims import Claim
from db.models import Image, Prediction, RescoreJob, utcnow
from db.prediction_roles import Role, link_roles
from db.vocabulary import ImageStatus, Label

RUNNING, FINISHED = "running", "done"


@dataclass(frozen=True)
class Job:
    id: int
    filters: dict[str, Any]
    pneumonia_model_id: int
    infection_model_id: int | None
    cursor: int
    total: int
    skipped: dict[str, str]
    status: str


def _job(row: RescoreJob) -> Job:
    return Job(row.id, dict(row.filters), row.pneumonia_model_id, row.infection_model_id,
               row.cursor, row.total, dict(row.skipped or {}), row.status)


def _selection(filters: dict[str, Any]):
    """The images a job covers: finished (``done``) ones, or as filtered."""
    where = [Image.status == (filters.get("status") or ImageStatus.DONE)]
    if filters.get("since"):
        where.append(Image.received_at >= datetime.fromisoformat(filters["since"]))
    if filters.get("until"):
        where.append(Image.received_at < datetime.fromisoformat(filters["until"]))
    query = select(Image.id).outerjoin(Prediction, Prediction.id == Image.prediction_id)
    if filters.get("label"):
        where.append(Prediction.label == filters["label"])
    return query.where(*where)


def _current(job: Job):
    """The shown prediction is the target versions' (a NORMAL never ran stage 2)."""
    key = job.infection_model_id or 0
    return and_(Prediction.pneumonia_model_id == job.pneumonia_model_id,
                or_(Prediction.infection_key == key, Prediction.label == Label.NORMAL))


def start_or_resume(session: Session, filters: dict[str, Any], pneumonia_model_id: int,
                    infection_model_id: int | None) -> tuple[Job, bool]:
    """The unfinished job with these filters and targets (resumed: True), else a new one."""
    row = session.scalar(
        select(RescoreJob).where(RescoreJob.status == RUNNING,
                                 RescoreJob.pneumonia_model_id == pneumonia_model_id,
                                 RescoreJob.infection_model_id.is_(None) if infection_model_id
                                 is None else RescoreJob.infection_model_id == infection_model_id)
        .order_by(RescoreJob.id.desc()).with_for_update())
    if row is not None and row.filters == filters:
        return _job(row), True
    total = session.scalar(select(func.count()).select_from(_selection(filters).subquery()))
    row = RescoreJob(filters=filters, pneumonia_model_id=pneumonia_model_id,
                     infection_model_id=infection_model_id, status=RUNNING, cursor=0,
                     total=int(total or 0), skipped={})
    session.add(row)
    session.flush()
    return _job(row), False


def get_job(session: Session, job_id: int) -> Job:
    return _job(session.get(RescoreJob, job_id))


def _pending(job: Job):
    selection = _selection(job.filters).where(not_(_current(job)) | Prediction.id.is_(None))
    skipped = [int(i) for i in job.skipped]
    return selection.where(Image.id.not_in(skipped)) if skipped else selection


def pending_ids(session: Session, job: Job, limit: int | None = None) -> list[int]:
    """The job's first images (by id) not yet showing a target prediction nor skipped."""
    query = _pending(job).order_by(Image.id)
    return list(session.scalars(query.limit(limit) if limit else query))


def still_pending(session: Session, job: Job, image_ids: Iterable[int]) -> list[int]:
    """Those of ``image_ids`` the job still needs (a message delivered twice finds none)."""
    return list(session.scalars(_pending(job).where(Image.id.in_(list(image_ids)))))


def count_pending(session: Session, job: Job) -> int:
    return int(session.scalar(select(func.count()).select_from(_pending(job).subquery())))


def advance(session: Session, job_id: int, cursor: int) -> None:
    """Record that images up to ``cursor`` have been sent."""
    session.execute(update(RescoreJob).where(RescoreJob.id == job_id, RescoreJob.cursor < cursor)
                    .values(cursor=cursor))


def finish(session: Session, job_id: int) -> None:
    session.execute(update(RescoreJob).where(RescoreJob.id == job_id)
                    .values(status=FINISHED, finished_at=utcnow()))


def skip(session: Session, job_id: int, reasons: dict[int, str]) -> None:
    """Images that keep their prediction (file gone or unreadable now), with why."""
    if not reasons:
        return
    row = session.scalar(select(RescoreJob).where(RescoreJob.id == job_id).with_for_update())
    if row is not None:
        row.skipped = {**(row.skipped or {}), **{str(k): v for k, v in reasons.items()}}


def done_claims(session: Session, image_ids: Iterable[int]) -> list[Claim]:
    """The ``done`` images among ``image_ids`` as claims to read (nothing is claimed: a done
    image is no live delivery's any more, and its row changes only by ``relink``)."""
    rows = session.execute(
        select(Image.id, Image.sha256, Image.file_name, Image.stored_path)
        .where(Image.id.in_(list(image_ids)), Image.status == ImageStatus.DONE)
        .order_by(Image.id))
    return [Claim(i, sha, name, stored, 0, False) for i, sha, name, stored in rows]


def relink(session: Session, links: list[tuple[int, int]]) -> None:
    """Make each (image id, prediction id) the prediction the done image shows, and record
    it in the image's history as a re-score; the earlier ones stay in the history."""
    for image_id, prediction_id in links:
        session.execute(update(Image).where(Image.id == image_id,
                                            Image.status == ImageStatus.DONE)
                        .values(prediction_id=prediction_id))
    link_roles(session, [(i, p, Role.RESCORE) for i, p in links])


def iso(when: datetime | None) -> str | None:
    """A filter's date as stored in the job (UTC ISO text)."""
    return None if when is None else when.astimezone(UTC).isoformat()
