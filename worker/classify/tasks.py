"""The Celery glue: the classify task, this process's model cache, and the start-up recovery.

The work itself is ``worker.classify.batch.process_images``; the task adds retries with backoff
(up to ``max_attempts`` deliveries, counted by the claims). Messages are sent by name from
``worker.classify.broker``, each carrying a batch of image ids.
"""

from __future__ import annotations

import logging
import time

from worker.classify.batch import process_images
from worker.classify.broker import send_ids, this_deployment
from worker.classify.celery_app import CLASSIFY_TASK, RESCORE_TASK, app, settings
from worker.classify.claiming import LiveHosts
from worker.classify.inference import ModelCache

log = logging.getLogger(__name__)

FOREIGN_DELAY_SECONDS = 1.0
"""How long another deployment's message waits before it is offered again: a worker that keeps
receiving it (its own workers busy or down) passes it on at this rate, not in a hot loop."""
FOREIGN_WARN_SECONDS = 60.0

_cache: ModelCache | None = None
_warned: dict[str, float] = {}
_live_hosts = LiveHosts()


def model_cache() -> ModelCache:
    """This process's model cache, created on first use (after fork)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.models_path, warm_batch=settings.batch_size)
    return _cache


@app.task(name=CLASSIFY_TASK, bind=True, max_retries=None, ignore_result=True)
def classify_images(self, image_ids: list[int], deployment: str | None = None
                    ) -> dict[str, int]:
    """Classify a batch of images by id; errors retry with backoff up to max_attempts.
    A message of another deployment (``deployment``: its database's id) is passed on to its
    own workers. Returns how many images ended in each state (Flower shows it)."""
    try:
        if deployment is not None and deployment != this_deployment(settings.db_url):
            return _pass_on(self.request, list(image_ids), deployment)
        outcome = process_images(image_ids, settings, model_cache(), task_id=self.request.id,
                                 live_hosts=_live_hosts)
    except Exception as exc:
        countdown = min(60, 2 ** max(0, self.request.retries))
        log.warning("images %s: %s; retrying in %ss", list(image_ids), type(exc).__name__,
                    countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
    counts: dict[str, int] = {}
    for state in outcome.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def _pass_on(request, image_ids: list[int], deployment: str) -> dict[str, int]:
    """Put another deployment's message back on its queue, after a short delay, so that a
    worker of that deployment takes it (this one never touches its own rows of the same ids);
    a warning at most once a minute per deployment."""
    queue = (request.delivery_info or {}).get("routing_key") or settings.queue
    shown = getattr(request, "argsrepr", None) or f"(image_ids={image_ids})"
    send_ids(image_ids, deployment, shown, queue, countdown=FOREIGN_DELAY_SECONDS)
    now = time.monotonic()
    if now - _warned.get(deployment, float("-inf")) >= FOREIGN_WARN_SECONDS:
        _warned[deployment] = now
        log.warning("queue %s carries messages of another deployment (database %s..., this one "
                    "is %s...): passed back for its own workers; give each deployment its own "
                    "CXR_QUEUE or Redis database", queue, deployment[:8],
                    this_deployment(settings.db_url)[:8])
    return {"other deployment": len(image_ids)}


@app.task(name=RESCORE_TASK, bind=True, max_retries=None, ignore_result=True)
def rescore_images(self, image_ids: list[int], job_id: int, deployment: str | None = None
                   ) -> dict[str, int]:
    """Re-score done images with today's production versions (``cxr rescore``), on the
    lower-priority queue; errors retry with backoff. Another deployment's message is left
    alone (its `cxr rescore` sends it again)."""
    from worker.classify.rescoring import rescore_images as rescore

    if deployment is not None and deployment != this_deployment(settings.db_url):
        return {"other deployment": len(image_ids)}
    try:
        return rescore(list(image_ids), int(job_id), settings, model_cache())
    except Exception as exc:
        countdown = min(60, 2 ** max(0, self.request.retries))
        log.warning("re-score of %s: %s; retrying in %ss", list(image_ids), type(exc).__name__,
                    countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
