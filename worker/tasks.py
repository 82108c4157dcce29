"""The Celery task: classify a received image by id, idempotently, in a batch when others wait.

``process_image`` holds the logic (callable without Celery, e.g. from tests); the task wraps
it with retries. A delivery claims its own image plus up to ``batch_size - 1`` other
``queued`` images (one conditional UPDATE, attempts counted, committed before inference, so
an image that keeps killing its worker ends ``failed`` instead of looping), decodes them in
threads, runs one forward pass per stage and writes every row in one transaction. The other
images' own tasks then find their rows final and do nothing: Flower still shows one task per
image, and each task still takes only an image id.

A row found ``processing`` is held by another delivery, alive (its batch) or dead (a crash).
Each claim records its holder (``host:pid``) and time, so the row's own task waits for a live
holder (doing other queued work meanwhile) and takes the row over at once from a holder that
has exited, or after ``claim_lease_seconds`` from one that hangs or whose host died. The
prediction upsert keeps one row per content and models even if two deliveries both finish.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from db import images
from db.exceptions import BadImageError
from db.images import Claim, Held
from db.session import session_scope
from db.vocabulary import FINAL_STATUSES, Stage
from worker.celery_app import CLASSIFY_TASK, THREADS_ENV, app, settings
from worker.inference import ModelCache, classify_arrays
from worker.settings import Settings

log = logging.getLogger(__name__)

FILL_POLL_SECONDS = 0.005
HELD_POLL_SECONDS = 0.2

_cache: ModelCache | None = None


def model_cache() -> ModelCache:
    """This process's model cache, created on first use (after fork)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.models_path, warm_batch=settings.batch_size)
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
    from db import registry

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
    own = _claim_own(settings, cache, image_id, batch_size, me)
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


def holder_id() -> str:
    """This process as a claim holder, ``host:pid`` (what ``images.claimed_by`` records)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_gone(held: Held, me: str, lease_seconds: float) -> bool:
    """True when nobody works on a held row any more, so its own task may take it over.

    That is: the holder is this very process (an earlier delivery here raised), a process on
    this host that has exited (a crash), unknown, or past its lease (hung, or its host died).
    """
    if held.holder is None or held.holder == me:
        return True
    host, _, pid = held.holder.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    age = held.age_seconds()
    return age is None or age >= lease_seconds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _claim_own(
    settings: Settings, cache: ModelCache, image_id: int, batch_size: int, me: str
) -> Claim | None:
    """Claim this task's image; while a live holder has it, do other queued work or wait.

    Returns None once the image is final (the holder classified it: nothing left to do).
    """
    url = settings.db_url
    while True:
        with session_scope(url) as session:
            own = images.claim_free(session, image_id, settings.max_attempts, me)
        if not isinstance(own, Held):
            return own
        if holder_gone(own, me, settings.claim_lease_seconds):
            if own.holder != me:
                log.info("image %s: taking it over from %s", image_id, own.holder or "unknown")
            with session_scope(url) as session:
                return images.claim(session, image_id, settings.max_attempts, me)
        if not (batch_size > 1 and _run_others(settings, cache, batch_size, me)):
            time.sleep(HELD_POLL_SECONDS)


def fill_batch(
    settings: Settings, room: int, exclude: list[int], holder: str | None = None
) -> list[Claim]:
    """Claim queued images until ``room`` are claimed or no new one came for ``batch_wait_ms``.

    The wait restarts whenever images arrive, so a burst still being taken from the inbox
    fills the batch, while a lone image waits ``batch_wait_ms`` once.
    """
    wait = settings.batch_wait_ms / 1000.0
    deadline = time.monotonic() + wait
    claimed: list[Claim] = []
    while True:
        with session_scope(settings.db_url) as session:
            new = images.claim_queued(
                session, room - len(claimed), [*exclude, *(c.image_id for c in claimed)], holder
            )
        claimed += new
        now = time.monotonic()
        if new:
            deadline = now + wait
        if len(claimed) >= room or now >= deadline:
            return claimed
        time.sleep(FILL_POLL_SECONDS)


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
    from trainer.decode import decode_many

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
    for c in claims:
        if paths[c.image_id] is None:
            rejections.append((c, "archived file is missing", None))
    for c, pixels in zip(present, decoded, strict=True):
        if isinstance(pixels, BadImageError):
            rejections.append((c, str(pixels), reject_file(settings, paths[c.image_id])))
        else:
            good_claims.append(c)
            good_pixels.append(pixels)
    decoded_at = time.perf_counter()
    results = []
    if good_claims:
        results = classify_arrays(np.stack(good_pixels), models.pneumonia, models.infection)
    forward_s = time.perf_counter() - decoded_at
    per_image_ms = forward_s * 1000.0 / max(1, len(good_claims))
    with session_scope(url) as session:
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
