"""The Celery task: classify one received image by id, idempotently.

``process_image`` holds the logic (callable without Celery, e.g. from tests); the task wraps
it with retries. A delivery is counted in the database before inference, so an image that
keeps killing its worker ends ``failed`` instead of looping.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from db import images
from db.models import Stage
from db.session import session_scope
from worker.celery_app import CLASSIFY_TASK, app, settings
from worker.exceptions import BadImageError
from worker.inference import ModelCache, classify_arrays
from worker.settings import Settings

log = logging.getLogger(__name__)

_cache: ModelCache | None = None


def model_cache() -> ModelCache:
    """This process's model cache, created on first use (after fork)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.models_path)
    return _cache


def enqueue(image_id: int, file_name: str) -> None:
    """Send one image to the inference queue; Flower shows only its id and file name."""
    classify_image.apply_async(
        args=[image_id],
        argsrepr=f"(image_id={image_id}, file={file_name!r})",
        kwargsrepr="{}",
        queue=settings.queue,
    )


def queue_is_empty() -> bool:
    """True when no message waits in the inference queue (reconcile's lost-message check)."""
    with app.connection_for_read() as conn:
        declared = conn.default_channel.queue_declare(queue=settings.queue)
        return declared.message_count == 0


def stored_file(settings: Settings, stored_path: str | None) -> Path | None:
    """The archived file for a row, or its copy in rejected/ when a twin was rejected first."""
    if not stored_path:
        return None
    path = Path(stored_path)
    if not path.is_absolute():
        path = settings.data_dir.absolute() / path
    if path.is_file():
        return path
    twin = settings.rejected_dir / path.name
    return twin if twin.is_file() else None


def reject_file(settings: Settings, path: Path) -> str:
    """Move a file that failed to decode into rejected/ (mode 0600); returns its stored path."""
    settings.rejected_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.rejected_dir, 0o700)
    target = settings.rejected_dir / path.name
    if path != target:
        shutil.move(str(path), target)
    os.chmod(target, 0o600)
    return str(target.relative_to(settings.data_dir.absolute()))


def process_image(image_id: int, settings: Settings, cache: ModelCache) -> str:
    """Classify one image; returns the final or parked status. Safe to run twice.

    The delivery is claimed (and counted) before any model is loaded, so a message waiting
    while a model loads is never mistaken for a lost one.
    """
    from db import registry
    from worker.decode import decode_image

    url = settings.db_url
    with session_scope(url) as session:
        if Stage.PNEUMONIA.value not in registry.production_ids(session):
            parked = images.mark_waiting_model(session, image_id)
            if parked:
                log.info("image %s waits for a production pneumonia model", image_id)
            return "waiting_model" if parked else "noop"
    with session_scope(url) as session:
        claim = images.claim(session, image_id, settings.max_attempts)
    if claim is None:
        log.info("image %s already final; redelivery ignored", image_id)
        return "noop"
    if claim.gave_up:
        log.warning("image %s (%s) failed after %s attempts", image_id, claim.file_name,
                    settings.max_attempts)
        return "failed"
    try:
        with session_scope(url) as session:
            models = cache.current(session)
        if models.pneumonia is None:  # demoted in the last milliseconds
            with session_scope(url) as session:
                images.mark_waiting_model(session, image_id)
            return "waiting_model"
        return _classify_claimed(claim, models, settings, decode_image)
    except Exception as exc:
        if claim.attempts >= settings.max_attempts:
            with session_scope(url) as session:
                images.mark_failed(session, image_id, f"{type(exc).__name__}: {exc}"[:500])
            log.exception("image %s (%s) failed", image_id, claim.file_name)
            return "failed"
        raise


def _classify_claimed(claim: images.Claim, models, settings: Settings, decode_image) -> str:
    url = settings.db_url
    path = stored_file(settings, claim.stored_path)
    if path is None:
        with session_scope(url) as session:
            images.mark_rejected(session, claim.image_id, "archived file is missing")
        log.warning("image %s (%s) rejected: archived file missing", claim.image_id,
                    claim.file_name)
        return "rejected"
    try:
        pixels = decode_image(path, models.pneumonia.input_size, settings.max_image_pixels)
    except BadImageError as exc:
        stored = reject_file(settings, path)
        with session_scope(url) as session:
            images.mark_rejected(session, claim.image_id, str(exc), stored_path=stored)
        log.info("image %s (%s) rejected: %s", claim.image_id, claim.file_name, exc)
        return "rejected"
    started = time.perf_counter()
    result = classify_arrays(pixels[None], models.pneumonia, models.infection)[0]
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    infection = models.infection if result.p_virus is not None else None
    with session_scope(url) as session:
        prediction = images.save_prediction(
            session,
            sha256=claim.sha256,
            pneumonia_model_id=models.pneumonia.model_id,
            infection_model_id=infection.model_id if infection else None,
            p_pneumonia=result.p_pneumonia,
            p_virus=result.p_virus,
            label=result.label,
            threshold=models.pneumonia.threshold,
            infection_threshold=infection.threshold if infection else None,
            inference_ms=elapsed_ms,
        )
        images.link_prediction(session, claim.image_id, prediction.id)
    log.info("image %s (%s): %s", claim.image_id, claim.file_name, result.label)
    return "done"


@app.task(name=CLASSIFY_TASK, bind=True, max_retries=None, ignore_result=True)
def classify_image(self, image_id: int) -> str:
    """Classify image ``image_id``; unexpected errors retry with backoff up to max_attempts."""
    try:
        return process_image(int(image_id), settings, model_cache())
    except Exception as exc:
        countdown = min(60, 2 ** max(0, self.request.retries))
        log.warning("image %s: %s; retrying in %ss", image_id, type(exc).__name__, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
