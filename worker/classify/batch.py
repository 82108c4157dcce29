"""Classifying a message's images together, as named steps.

``process_images`` is what a delivery does (callable without Celery, e.g. from tests): leave
ids this database does not hold, park the images when no model is in production, claim the rest
(``worker.classify.claiming``), then classify them. A redelivered message (some image already
tried) runs its images one at a time, so an image that crashes the worker fails by itself.

``classify_claimed`` reads as its steps: refresh the models, read and classify (decoding
threads feed forward passes of ``CXR_BATCH_SIZE`` as images come in, ``worker.classify.reading``
checks each file against what intake hashed), draw heatmaps, record every outcome in one
transaction, hand back what was missing. The prediction upsert keeps one row per content and
models even if two deliveries both finish.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from db import images, predictions, registry
from db.claims import Claim, requeue
from db.deployment import unknown_ids
from db.monitoring import received_times
from db.predictions import Answer, Rejection
from db.session import session_scope
from db.vocabulary import Review
from trainer.imaging.budget import MemoryBudget
from worker.classify import metrics
from worker.classify.celery_app import THREADS_ENV
from worker.classify.claiming import claim_images, holder_id
from worker.classify.gating import GateRefused, classify_gated
from worker.classify.inference import ModelCache, Models, classify_arrays
from worker.classify.reading import Read, read_claim
from worker.classify.shadow import run_shadows, shadow_row
from worker.files.storage import reject_archived, stored_file
from worker.settings import Settings

log = logging.getLogger(__name__)

MISSING_RETRY_MAX_SECONDS = 60


@dataclass
class BatchRun:
    """What the read and classify step leaves for the steps after it."""

    read: list[Read] = field(default_factory=list)
    """Every image, in order."""
    good: list[Read] = field(default_factory=list)
    results: list = field(default_factory=list)
    """The cascade's answer for each of ``good``."""
    shadow: list = field(default_factory=list)
    """The shadow versions' answers (``worker.classify.shadow.ShadowAnswer``), by index into
    ``good``: stored, never shown."""
    waited_s: float = 0.0
    forward_s: float = 0.0
    shadow_s: float = 0.0


def decode_threads() -> int:
    """Decode threads: this process's share of the cores (Pillow releases the GIL)."""
    share = int(os.environ.get(THREADS_ENV, "0") or 0)
    return max(1, share or (os.cpu_count() or 1))


def process_images(
    image_ids: Iterable[int], settings: Settings, cache: ModelCache, task_id: str | None = None,
    live_hosts: Callable[[], set[str] | None] | None = None,
) -> dict[int, str]:
    """Classify the open images among ``image_ids``; returns image id -> what happened
    (``done``, ``rejected``, ``failed``, ``waiting_model``, ``retry`` or ``held``). Safe to
    run twice: final images are skipped.

    An error propagates (for the task to retry) unless every image it hit has used its
    attempts, in which case they are marked ``failed`` with the error.
    """
    ids, waiting = _known_and_servable(settings, [int(i) for i in image_ids])
    if not ids:
        return dict.fromkeys(waiting, "waiting_model")
    claimed = claim_images(settings, ids, holder_id(), task_id, live_hosts)
    outcome = {c.image_id: "failed" for c in claimed.failed}
    outcome.update({h.image_id: "held" for h in claimed.left})
    for c in claimed.failed:
        log.warning("%s failed after %s attempts", settings.describe(c.image_id, c.file_name),
                    settings.max_attempts)
    alone = any(c.attempts > 1 for c in claimed.claims)
    groups = [[c] for c in claimed.claims] if alone else [claimed.claims]
    for group in filter(None, groups):
        try:
            outcome.update(classify_claimed(group, settings, cache))
        except Exception as exc:
            outcome.update(_fail_spent(group, settings, exc))
    metrics.observe_failed(sum(1 for v in outcome.values() if v == "failed"))
    return outcome


def _known_and_servable(settings: Settings, ids: list[int]) -> tuple[list[int], list[int]]:
    """(the ids to claim, the ids parked as ``waiting_model``): ids this database does not hold
    are left (another deployment's, or deleted rows); without a production pneumonia model
    every image waits."""
    waiting: list[int] = []
    with session_scope(settings.db_url) as session:
        unknown = set(unknown_ids(session, ids))
        ids = [i for i in ids if i not in unknown]
        if ids and not registry.has_production(session):
            parked = images.mark_waiting_model(session, ids)
            if parked:
                log.info("%d image(s) wait for a production pneumonia model", parked)
                waiting = ids
            ids = []
    if unknown:
        log.warning("%d image id(s) of this message are not in this database (first %s): a "
                    "message of another deployment on the same queue, or rows deleted; ignored",
                    len(unknown), min(unknown))
    return ids, waiting


def _fail_spent(group: list[Claim], settings: Settings, exc: Exception) -> dict[int, str]:
    """A group that raised: images past their attempts are ``failed`` with the error; if any
    has attempts left, the error propagates for the task to retry."""
    spent = [c for c in group if c.attempts >= settings.max_attempts]
    with session_scope(settings.db_url) as session:
        for c in spent:
            images.mark_failed(session, c.image_id, f"{type(exc).__name__}: {exc}"[:500])
    for c in spent:
        log.exception("%s failed", settings.describe(c.image_id, c.file_name))
    if len(spent) < len(group):
        raise exc
    return dict.fromkeys((c.image_id for c in spent), "failed")


def classify_claimed(claims: list[Claim], settings: Settings, cache: ModelCache
                     ) -> dict[int, str]:
    """Read, check, decode and classify claimed images; write every row in one transaction."""
    models = refresh_models(claims, settings, cache)
    if models is None:
        return dict.fromkeys((c.image_id for c in claims), "waiting_model")
    started = time.perf_counter()
    run = read_and_classify(claims, settings, models)
    heatmaps = draw_heatmaps(run, settings, models)
    outcome = record(run, settings, models, heatmaps)
    outcome.update(retry_missing([r.claim for r in run.read if r.missing], settings))
    _log_batch(run, settings, time.perf_counter() - started)
    return outcome


def refresh_models(claims: list[Claim], settings: Settings, cache: ModelCache) -> Models | None:
    """Step 1: the production models now (reloaded when a promotion changed them); None, with
    the images parked, when the pneumonia model was demoted in the last milliseconds."""
    with session_scope(settings.db_url) as session:
        models = cache.current(session)
        if models.pneumonia is None:
            images.mark_waiting_model(session, [c.image_id for c in claims])
            return None
    return models


def read_and_classify(claims: list[Claim], settings: Settings, models: Models) -> BatchRun:
    """Step 2: read and decode in threads, classify in forward passes of ``CXR_BATCH_SIZE`` as
    decoded images come in: every image is handed to the threads at once, so they decode the
    next ones while the model runs on these, and a GPU (or the other core) does not wait for
    the whole message to decode."""
    step = max(1, settings.batch_size)
    run = BatchRun()
    budget = MemoryBudget(settings.decode_memory_mb * 1024 * 1024)
    feeds = (models.pneumonia.feed, (models.infection or models.pneumonia).feed)
    pool = ThreadPoolExecutor(max_workers=max(1, min(decode_threads(), len(claims))))
    try:
        colour = models.pneumonia.gate is not None
        pending = [pool.submit(metrics.timed, read_claim, claim, settings, feeds, budget, colour)
                   for claim in claims]
        for start in range(0, len(claims), step):
            began = time.perf_counter()
            chunk = [future.result() for future in pending[start:start + step]]
            decoded = [r for r in chunk if r.pixels is not None]
            run.waited_s += time.perf_counter() - began
            run.read += chunk
            if decoded:
                began = time.perf_counter()
                classify_decoded(decoded, models, run)
                run.forward_s += time.perf_counter() - began
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return run


def classify_decoded(decoded: list[Read], models: Models, run: BatchRun) -> None:
    """Step 2's forward pass: the input gate (when the stage-1 bundle has one) and the
    cascade on what it passed, then the shadow versions on the same pixels; an image the gate
    refused becomes a refusal with no label (``review`` = ``out_of_scope``), its file kept in
    ``rejected/`` like any other."""
    batch = np.stack([r.pixels for r in decoded])
    answers = classify_gated(batch, models.pneumonia, models.infection, _stage_two(decoded),
                             [r.colour for r in decoded], classify=classify_arrays)
    passed: list[Read] = []
    results: list = []
    for read, answer in zip(decoded, answers, strict=True):
        if isinstance(answer, GateRefused):
            read.pixels, read.second, read.rejected = None, None, answer.reason
            read.review, read.gate_score = Review.OUT_OF_SCOPE, answer.gate_score
        else:
            passed.append(read)
            results.append(answer)
    if passed and (models.shadow_pneumonia is not None or models.shadow_infection is not None):
        pixels = batch if len(passed) == len(decoded) else np.stack([r.pixels for r in passed])
        _shadow(run, pixels, models, results, _stage_two(passed))
    run.good += passed
    run.results += results


def _shadow(run: BatchRun, pixels: np.ndarray, models: Models, answers: list,
            stage_two) -> None:
    """The shadow versions on the same pixels as production. A shadow that fails costs its
    own answers only: production's stand."""
    began = time.perf_counter()
    try:
        run.shadow += run_shadows(pixels, models, answers, stage_two, offset=len(run.good))
    except Exception:
        log.exception("a shadow version failed on this batch; production's answers stand")
    run.shadow_s += time.perf_counter() - began


def draw_heatmaps(run: BatchRun, settings: Settings, models: Models) -> dict[str, str]:
    """Step 3 (``CXR_HEATMAPS``): sha256 -> heatmap path for each positive, drawn before the
    rows are written so each prediction names its own."""
    if not (settings.heatmaps and run.good):
        return {}
    from worker.classify.heatmaps import write_heatmaps

    return write_heatmaps(settings, models, run.results, np.stack([r.pixels for r in run.good]),
                          [r.claim.sha256 for r in run.good], _stage_two(run.good))


def record(run: BatchRun, settings: Settings, models: Models, heatmaps: dict[str, str]
           ) -> dict[int, str]:
    """Step 4: move refused files into ``rejected/``, then record every outcome (identifiers,
    refusals, predictions) in one call and one transaction."""
    per_image_ms = run.forward_s * 1000.0 / max(1, len(run.good))
    rejections = [Rejection(r.claim.image_id, r.rejected, _reject_file(r.claim, settings),
                            r.review, r.gate_score)
                  for r in run.read if r.rejected is not None]
    answers = [Answer(r.claim.image_id, _prediction_row(r.claim, result, models, per_image_ms,
                                                        heatmaps), r.note)
               for r, result in zip(run.good, run.results, strict=True)]
    identifiers = {r.claim.image_id: r.identifiers for r in run.read
                   if r.identifiers is not None}
    shadow_ms = run.shadow_s * 1000.0 / max(1, len(run.good))
    shadows = [Answer(run.good[s.index].claim.image_id,
                      shadow_row(run.good[s.index].claim.sha256, s, shadow_ms))
               for s in run.shadow]
    done = [a.image_id for a in answers]
    with session_scope(settings.db_url) as session:
        predictions.record_batch(session, answers, rejections, identifiers, shadows)
        received = received_times(session, done) if metrics.enabled() else {}
    version = f"pneumonia/v{models.pneumonia.version}"
    flags = [str(r.review) for r in [*run.results, *rejections] if r.review]
    metrics.observe_batch([(str(r.label), version) for r in run.results],
                          [r.reason for r in rejections], run.forward_s, len(run.read),
                          received, done, flags)
    outcome = dict.fromkeys((r.image_id for r in rejections), "rejected")
    outcome.update(dict.fromkeys((a.image_id for a in answers), "done"))
    return outcome


def _reject_file(claim: Claim, settings: Settings) -> str | None:
    """The refused file's new place in ``rejected/`` (None when it is not in the archive)."""
    path = stored_file(settings, claim.stored_path)
    if path is None or path.parent == settings.rejected_dir:
        return None
    return reject_archived(settings, path)


def _prediction_row(claim: Claim, result, models: Models, per_image_ms: float,
                    heatmaps: dict[str, str]) -> dict:
    """What ``predictions.save_predictions`` stores for one image: the cascade's answer and
    the versions and thresholds that gave it."""
    infection = models.infection if result.p_virus is not None else None
    return dict(
        sha256=claim.sha256, pneumonia_model_id=models.pneumonia.model_id,
        infection_model_id=infection.model_id if infection else None,
        p_pneumonia=result.p_pneumonia, p_virus=result.p_virus, label=result.label,
        threshold=models.pneumonia.threshold,
        infection_threshold=infection.threshold if infection else None,
        inference_ms=per_image_ms, heatmap_path=heatmaps.get(claim.sha256),
        gate_score=result.gate_score, review=result.review,
    )


def _stage_two(good: list[Read]):
    """Stage-2 pixels, decoded from the same checked bytes at stage 2's own feed when the image
    was read (resizing stage-1 pixels would feed pixels it never saw)."""

    def pixels(indices: np.ndarray, feed) -> np.ndarray:
        return np.stack([good[i].second for i in indices])

    return pixels


def retry_missing(missing: list[Claim], settings: Settings) -> dict[int, str]:
    """Step 5: an archived file that is not there may come back (a network filesystem blip):
    hand the image back and send it again later; only once its attempts are used up is it
    ``failed``."""
    if not missing:
        return {}
    from worker.classify.broker import enqueue_batch

    reason = "the archived file is missing"
    spent = [c for c in missing if c.attempts >= settings.max_attempts]
    again = [c for c in missing if c.attempts < settings.max_attempts]
    with session_scope(settings.db_url) as session:
        for c in spent:
            images.mark_failed(session, c.image_id,
                               f"{reason} (gave up after {c.attempts} attempts)")
        requeue(session, [c.image_id for c in again], f"{reason}; will try again")
    outcome = dict.fromkeys((c.image_id for c in spent), "failed")
    for c in again:
        delay = min(MISSING_RETRY_MAX_SECONDS, 2 ** c.attempts)
        log.warning("%s: %s; trying again in %s s", settings.describe(c.image_id, c.file_name),
                    reason, delay)
        enqueue_batch([(c.image_id, c.file_name)], countdown=delay)
        outcome[c.image_id] = "retry"
    return outcome


def _log_batch(run: BatchRun, settings: Settings, total_s: float) -> None:
    for r in run.read:
        if r.rejected is not None:
            log.info("%s rejected: %s", settings.describe(r.claim.image_id, r.claim.file_name),
                     r.rejected)
    for r, result in zip(run.good, run.results, strict=True):
        log.info("%s: %s", settings.describe(r.claim.image_id, r.claim.file_name), result.label)
    log.info("batch of %d: decode %.0f ms, forward %.0f ms, shadow %.0f ms, total %.0f ms",
             len(run.read), run.waited_s * 1000.0, run.forward_s * 1000.0,
             run.shadow_s * 1000.0, total_s * 1000.0)
