"""Classifying claimed images together: decode in threads, one forward pass per stage, every
row written in one transaction.

``process_image`` is what a delivery does (callable without Celery, e.g. from tests): claim its
image (``worker.claims``), fill a batch with other queued images, classify them all. The other
images' own tasks then find their rows final and do nothing, so Flower still shows one task per
image and each task still takes only an image id. The prediction upsert keeps one row per
content and models even if two deliveries both finish.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from db import images, registry
from db.exceptions import BadImageError
from db.identifiers import DicomIdentifiers
from db.images import Claim
from db.session import session_scope
from db.vocabulary import FINAL_STATUSES, Stage
from trainer.decode import decode_many
from worker.celery_app import THREADS_ENV
from worker.claims import claim_own, fill_batch, holder_id
from worker.inference import ModelCache, classify_arrays
from worker.settings import Settings
from worker.storage import reject_archived, stored_file

log = logging.getLogger(__name__)


def decode_threads() -> int:
    """Decode threads: this process's share of the cores (Pillow releases the GIL)."""
    share = int(os.environ.get(THREADS_ENV, "0") or 0)
    return max(1, share or (os.cpu_count() or 1))


def process_image(
    image_id: int, settings: Settings, cache: ModelCache, batch_size: int = 1
) -> str:
    """Classify image ``image_id`` and, when ``batch_size`` > 1, up to ``batch_size - 1`` other
    queued images with it. Returns this image's final or parked status. Safe to run twice.

    The delivery is claimed (and counted) before any model is loaded, so a message waiting
    while a model loads is never mistaken for a lost one. A redelivered image (attempts > 1)
    runs alone, so an image that crashes the worker fails by itself.
    """
    url = settings.db_url
    with session_scope(url) as session:
        if images.status_of(session, image_id) in (*FINAL_STATUSES, None):
            log.debug("image %s already final; delivery ignored", image_id)
            return "noop"
        if Stage.PNEUMONIA.value not in registry.production_ids(session):
            parked = images.mark_waiting_model(session, image_id)
            if parked:
                log.info("image %s waits for a production pneumonia model", image_id)
            return "waiting_model" if parked else "noop"
    me = holder_id()
    own = claim_own(settings, image_id, me,
                    lambda: batch_size > 1 and _run_others(settings, cache, batch_size, me))
    if own is None:
        log.info("image %s already final; redelivery ignored", image_id)
        return "noop"
    if own.gave_up:
        log.warning("image %s (%s) failed after %s attempts", image_id, own.file_name,
                    settings.max_attempts)
        return "failed"
    claims = [own]
    if batch_size > 1 and own.attempts <= 1:
        claims += fill_batch(settings, batch_size - 1, exclude=[own.image_id], holder=me)
    try:
        return run_batch(claims, settings, cache, own_id=image_id)[image_id]
    except Exception as exc:
        if own.attempts >= settings.max_attempts:
            with session_scope(url) as session:
                images.mark_failed(session, image_id, f"{type(exc).__name__}: {exc}"[:500])
            log.exception("image %s (%s) failed", image_id, own.file_name)
            return "failed"
        raise


def _run_others(settings: Settings, cache: ModelCache, batch_size: int, me: str) -> bool:
    """Useful work while another delivery holds this task's image: a batch of queued ones.
    False when there was none."""
    with session_scope(settings.db_url) as session:
        others = images.claim_queued(session, batch_size, holder=me)
    if others:
        run_batch(others, settings, cache)
    return bool(others)


def run_batch(
    claims: list[Claim], settings: Settings, cache: ModelCache, own_id: int | None = None
) -> dict[int, str]:
    """Classify claimed images together; returns image id -> status.

    On an error every claimed row but ``own_id`` is handed back to the queue (attempt counted)
    and the error propagates for ``own_id``'s task to retry.
    """
    try:
        return _classify_claimed(claims, settings, cache)
    except Exception:
        try:
            with session_scope(settings.db_url) as session:
                images.release(session, [c.image_id for c in claims if c.image_id != own_id])
        except Exception as exc:  # their own tasks take them over later
            log.warning("could not hand back a failed batch (%s)", type(exc).__name__)
        raise


def _classify_claimed(claims: list[Claim], settings: Settings, cache: ModelCache) -> dict[int, str]:
    url = settings.db_url
    with session_scope(url) as session:
        models = cache.current(session)
    outcome: dict[int, str] = {}
    if models.pneumonia is None:  # demoted in the last milliseconds
        with session_scope(url) as session:
            for c in claims:
                images.mark_waiting_model(session, c.image_id)
        return dict.fromkeys((c.image_id for c in claims), "waiting_model")
    started = time.perf_counter()
    paths = {c.image_id: stored_file(settings, c.stored_path) for c in claims}
    present = [c for c in claims if paths[c.image_id] is not None]
    decoded = decode_many([paths[c.image_id] for c in present], models.pneumonia.input_size,
                          settings.max_image_pixels, threads=decode_threads())
    good_claims: list[Claim] = []
    good_pixels: list[np.ndarray] = []
    rejections: list[tuple[Claim, str, str | None]] = []
    identifiers: dict[int, DicomIdentifiers] = {}
    for c in claims:
        if paths[c.image_id] is None:
            rejections.append((c, "archived file is missing", None))
    for c, result in zip(present, decoded, strict=True):
        if result.identifiers is not None:
            identifiers[c.image_id] = result.identifiers
        if isinstance(result, BadImageError):
            rejections.append((c, str(result), reject_archived(settings, paths[c.image_id])))
        else:
            good_claims.append(c)
            good_pixels.append(result.pixels)
    decoded_at = time.perf_counter()
    results = []
    if good_claims:
        results = classify_arrays(np.stack(good_pixels), models.pneumonia, models.infection)
    forward_s = time.perf_counter() - decoded_at
    per_image_ms = forward_s * 1000.0 / max(1, len(good_claims))
    with session_scope(url) as session:
        for image_id, found in identifiers.items():
            images.set_identifiers(session, image_id, found)
        for c, reason, stored in rejections:
            images.mark_rejected(session, c.image_id, reason, stored_path=stored)
            outcome[c.image_id] = "rejected"
        for c, result in zip(good_claims, results, strict=True):
            infection = models.infection if result.p_virus is not None else None
            prediction = images.save_prediction(
                session,
                sha256=c.sha256,
                pneumonia_model_id=models.pneumonia.model_id,
                infection_model_id=infection.model_id if infection else None,
                p_pneumonia=result.p_pneumonia,
                p_virus=result.p_virus,
                label=result.label,
                threshold=models.pneumonia.threshold,
                infection_threshold=infection.threshold if infection else None,
                inference_ms=per_image_ms,
            )
            images.link_prediction(session, c.image_id, prediction.id)
            outcome[c.image_id] = "done"
    for c, reason, _ in rejections:
        log.info("image %s (%s) rejected: %s", c.image_id, c.file_name, reason)
    for c, result in zip(good_claims, results, strict=True):
        log.info("image %s (%s): %s", c.image_id, c.file_name, result.label)
    log.info(
        "batch of %d: decode %.0f ms, forward %.0f ms, total %.0f ms",
        len(claims), (decoded_at - started) * 1000.0, forward_s * 1000.0,
        (time.perf_counter() - started) * 1000.0,
    )
    return outcome
