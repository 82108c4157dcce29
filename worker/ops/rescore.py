"""Driving a re-score (`cxr rescore`): a job row in the database, messages on the
lower-priority queue a few at a time, a progress bar with an ETA, and a resume after a crash.

The command keeps at most ``window`` messages on their way, so its queue never buries a
deployment's Redis; the images left are always a query (``db.rescore_jobs.pending_ids``), so a
killed command, a killed worker or a lost message cost a re-send, never a wrong count. A
message sent twice is harmless: the worker reuses a prediction the versions already made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db import audit, registry
from db import rescore_jobs as jobs
from db.exceptions import CxrError, ModelNotFoundError
from db.session import session_scope
from db.vocabulary import Stage
from worker.settings import Settings

POLL_SECONDS = 0.5
WINDOW_MESSAGES = 4
STALL_SECONDS = 120.0
"""No progress for this long: the messages on their way are taken as lost and sent again."""


@dataclass
class Outcome:
    job_id: int
    resumed: bool
    total: int
    skipped: dict[str, str]


def filters(since: datetime | None, until: datetime | None, label: str | None,
            status: str | None) -> dict[str, Any]:
    return {k: v for k, v in {"since": jobs.iso(since), "until": jobs.iso(until),
                              "label": label, "status": status}.items() if v}


def _send(settings: Settings, ids: list[int], job_id: int) -> None:
    from worker.classify.broker import this_deployment
    from worker.classify.celery_app import RESCORE_SUFFIX, RESCORE_TASK, app

    app.send_task(RESCORE_TASK, args=[ids, job_id],
                  kwargs={"deployment": this_deployment(settings.db_url)},
                  argsrepr=f"(image_ids={ids}, job={job_id})",
                  queue=settings.queue + RESCORE_SUFFIX)


def start(settings: Settings, wanted: dict[str, Any], actor: str | None, reason: str | None
          ) -> tuple[jobs.Job, bool]:
    """The job for these filters and today's production versions, new or resumed, audited."""
    with session_scope(settings.db_url) as session:
        ids = registry.production_ids(session)
        if Stage.PNEUMONIA.value not in ids:
            raise ModelNotFoundError("no production pneumonia model: nothing to re-score with")
        job, resumed = jobs.start_or_resume(session, wanted, ids[Stage.PNEUMONIA.value],
                                            ids.get(Stage.INFECTION.value))
        versions = {m.stage: m.version for m in registry.list_versions(session)
                    if m.id in ids.values()}
        audit.record(session, "rescore resumed" if resumed else "rescore", detail={
            "job": job.id, "filters": wanted, "versions": versions, "images": job.total},
            actor=actor, reason=reason)
    return job, resumed


def run(settings: Settings, wanted: dict[str, Any], *, actor: str | None = None,
        reason: str | None = None, window: int = WINDOW_MESSAGES, progress: bool = True
        ) -> Outcome:
    """Re-score every image ``wanted`` selects until none is left."""
    from tqdm import tqdm

    job, resumed = start(settings, wanted, actor, reason)
    size = max(1, settings.message_size)
    sent: set[int] = set()
    last_change, last_left = time.monotonic(), None
    with tqdm(total=job.total, unit="image", disable=not progress, desc="re-score") as bar:
        while True:
            with session_scope(settings.db_url) as session:
                _check_production(session, job)
                job = jobs.get_job(session, job.id)
                left = jobs.count_pending(session, job)
                pending = jobs.pending_ids(session, job, limit=2 * window * size)
            bar.n = max(0, job.total - left)
            bar.refresh()
            if not pending:
                break
            if left != last_left:
                last_change, last_left = time.monotonic(), left
            elif time.monotonic() - last_change > STALL_SECONDS:
                sent.clear()  # nothing moved: what was on its way is lost; send again
                last_change = time.monotonic()
            _top_up(settings, job, pending, sent, window * size, size)
            time.sleep(POLL_SECONDS)
    with session_scope(settings.db_url) as session:
        jobs.finish(session, job.id)
        job = jobs.get_job(session, job.id)
        audit.record(session, "rescore done", detail={"job": job.id, "images": job.total,
                                                      "skipped": len(job.skipped)},
                     actor=actor, reason=reason)
    return Outcome(job.id, resumed, job.total, job.skipped)


def _top_up(settings: Settings, job: jobs.Job, pending: list[int], sent: set[int],
            limit: int, size: int) -> None:
    """Send the next pending images until ``limit`` are on their way; move the cursor."""
    on_way = sent.intersection(pending)
    sent.intersection_update(pending)
    fresh = [i for i in pending if i not in on_way][:max(0, limit - len(on_way))]
    for start in range(0, len(fresh), size):
        chunk = fresh[start:start + size]
        _send(settings, chunk, job.id)
        sent.update(chunk)
        with session_scope(settings.db_url) as session:
            jobs.advance(session, job.id, max(chunk))


def _check_production(session, job: jobs.Job) -> None:
    ids = registry.production_ids(session)
    if (ids.get(Stage.PNEUMONIA.value), ids.get(Stage.INFECTION.value)) != (
            job.pneumonia_model_id, job.infection_model_id):
        raise CxrError("the production models changed during the re-score; run `cxr rescore` "
                       "again to re-score with the new ones")
