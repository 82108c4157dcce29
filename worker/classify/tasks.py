"""The Celery glue: the classify task, this process's model cache, and the start-up recovery.

The work itself is ``worker.classify.batch.process_images``; the task adds retries with backoff
(up to ``max_attempts`` deliveries, counted by the claims). Messages are sent by name from
``worker.classify.broker``, each carrying a batch of image ids.
"""

from __future__ import annotations

import logging

from worker.classify.batch import process_images
from worker.classify.celery_app import CLASSIFY_TASK, app, settings
from worker.classify.claiming import LiveHosts
from worker.classify.inference import ModelCache

log = logging.getLogger(__name__)

_cache: ModelCache | None = None
_live_hosts = LiveHosts()


def model_cache() -> ModelCache:
    """This process's model cache, created on first use (after fork)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.models_path, warm_batch=settings.batch_size)
    return _cache


@app.task(name=CLASSIFY_TASK, bind=True, max_retries=None, ignore_result=True)
def classify_images(self, image_ids: list[int]) -> dict[str, int]:
    """Classify a batch of images by id; errors retry with backoff up to max_attempts.
    Returns how many images ended in each state (Flower shows it)."""
    try:
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
