"""The Celery glue: the classify task and this process's model cache.

The work itself is ``worker.batch.process_image``; the task adds retries with backoff (up to
``max_attempts`` deliveries, counted by the claim). Messages are sent by name from
``worker.broker``.
"""

from __future__ import annotations

import logging

from worker.batch import process_image
from worker.celery_app import CLASSIFY_TASK, app, settings
from worker.inference import ModelCache

log = logging.getLogger(__name__)

_cache: ModelCache | None = None


def model_cache() -> ModelCache:
    """This process's model cache, created on first use (after fork)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.models_path, warm_batch=settings.batch_size)
    return _cache


@app.task(name=CLASSIFY_TASK, bind=True, max_retries=None, ignore_result=True)
def classify_image(self, image_id: int) -> str:
    """Classify image ``image_id`` (with queued others); errors retry with backoff up to
    max_attempts."""
    try:
        return process_image(int(image_id), settings, model_cache(), settings.batch_size)
    except Exception as exc:
        countdown = min(60, 2 ** max(0, self.request.retries))
        log.warning("image %s: %s; retrying in %ss", image_id, type(exc).__name__, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
