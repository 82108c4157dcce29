"""Classifying a message's images together: read and decode in threads, forward passes of
``CXR_BATCH_SIZE`` images as they are decoded, every row written in one transaction.

``process_images`` is what a delivery does (callable without Celery, e.g. from tests): claim
the images its message names (``worker.claims``), then classify them. A redelivered message
(some image already tried) runs its images one at a time, so an image that crashes the worker
fails by itself. The prediction upsert keeps one row per content and models even if two
deliveries both finish.

What the worker decodes is what intake hashed: each archived file is read once, in chunks,
its SHA-256 checked against the row, and decoded from those bytes. Reading and decoding wait
for a memory budget (``CXR_DECODE_MEMORY_MB``); only the image's own bytes are kept (data
after a JPEG's EOI or a PNG's IEND is hashed, never held), and they are dropped once both
stages' pixels are decoded, so a message holds pixels, not files. The forward passes
(``CXR_BATCH_SIZE`` images each) start as soon as their images are decoded, so the model and
the decoder work at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from db import images, registry
from db.deployment import unknown_ids
from db.exceptions import BadImageError
from db.identifiers import DicomIdentifiers
from db.images import Claim
from db.session import session_scope
from db.vocabulary import Stage
from trainer.decode import (
    SUPPORTED_FORMATS,
    MemoryBudget,
    decode_bytes,
    decode_cost,
    decode_data,
    sniff_bytes,
)
from trainer.extent import EndFinder
from worker.celery_app import THREADS_ENV
from worker.claims import claim_images, holder_id
from worker.inference import ModelCache, classify_arrays
from worker.settings import Settings
from worker.storage import reject_archived, stored_file

log = logging.getLogger(__name__)

MISSING_RETRY_MAX_SECONDS = 60
HEAD_BYTES = 1 << 16
"""Bytes read first: enough to name the format and read the declared size of most images."""
READ_CHUNK = 1 << 20
"""Bytes read (and hashed) at a time; trailing data after an image never stays longer."""


@dataclass
class _Read:
    """One claimed image after reading: pixels, or why not."""

    claim: Claim
    pixels: np.ndarray | None = None
    second: np.ndarray | None = None
    """Stage 2's pixels when it takes another input size (decoded from the same bytes)."""
    rejected: str | None = None
    missing: bool = False
    identifiers: DicomIdentifiers | None = None
    """A DICOM's study, series and instance UIDs etc. (kept even when it is rejected)."""


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
    ids = [int(i) for i in image_ids]
    waiting: list[int] = []
    with session_scope(settings.db_url) as session:
        unknown = set(unknown_ids(session, ids))
        ids = [i for i in ids if i not in unknown]
        if ids and Stage.PNEUMONIA.value not in registry.production_ids(session):
            parked = images.mark_waiting_model(session, ids)
            if parked:
                log.info("%d image(s) wait for a production pneumonia model", parked)
                waiting = ids
            ids = []
    if unknown:
        log.warning("%d image id(s) of this message are not in this database (first %s): a "
                    "message of another deployment on the same queue, or rows deleted; ignored",
                    len(unknown), min(unknown))
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
            spent = [c for c in group if c.attempts >= settings.max_attempts]
            with session_scope(settings.db_url) as session:
                for c in spent:
                    images.mark_failed(session, c.image_id, f"{type(exc).__name__}: {exc}"[:500])
            for c in spent:
                log.exception("%s failed", settings.describe(c.image_id, c.file_name))
                outcome[c.image_id] = "failed"
            if len(spent) < len(group):
                raise
    return outcome


def classify_claimed(claims: list[Claim], settings: Settings, cache: ModelCache
                     ) -> dict[int, str]:
    """Read, check, decode and classify claimed images; write every row in one transaction."""
    url = settings.db_url
    with session_scope(url) as session:
        models = cache.current(session)
    if models.pneumonia is None:  # demoted in the last milliseconds
        with session_scope(url) as session:
            images.mark_waiting_model(session, [c.image_id for c in claims])
        return dict.fromkeys((c.image_id for c in claims), "waiting_model")
    started = time.perf_counter()
    read, good, results, waited_s, forward_s = _decode_and_classify(claims, settings, models)
    per_image_ms = forward_s * 1000.0 / max(1, len(good))
    # --- heatmaps (CXR_HEATMAPS, worker.heatmaps): drawn before the rows are written ---------
    heatmaps: dict[str, str] = {}
    if settings.heatmaps and good:
        from worker.heatmaps import write_heatmaps

        heatmaps = write_heatmaps(settings, models, results, np.stack([r.pixels for r in good]),
                                  [r.claim.sha256 for r in good], _stage_two(good))
    # ------------------------------------------------------------------------------------------
    outcome: dict[int, str] = {}
    missing = [r.claim for r in read if r.missing]
    with session_scope(url) as session:
        for r in read:
            if r.identifiers is not None:
                images.set_identifiers(session, r.claim.image_id, r.identifiers)
            if r.rejected is not None:
                stored = None
                path = stored_file(settings, r.claim.stored_path)
                if path is not None and path.parent != settings.rejected_dir:
                    stored = reject_archived(settings, path)
                images.mark_rejected(session, r.claim.image_id, r.rejected, stored_path=stored)
                outcome[r.claim.image_id] = "rejected"
        rows = [_prediction_row(r.claim, result, models, per_image_ms, heatmaps)
                for r, result in zip(good, results, strict=True)]
        prediction_ids = images.save_predictions(session, rows)
        images.link_predictions(session, [
            (r.claim.image_id, prediction_id)
            for r, prediction_id in zip(good, prediction_ids, strict=True)
        ])
        outcome.update(dict.fromkeys((r.claim.image_id for r in good), "done"))
    outcome.update(_retry_missing(missing, settings))
    for r in read:
        if r.rejected is not None:
            log.info("%s rejected: %s", settings.describe(r.claim.image_id, r.claim.file_name),
                     r.rejected)
    for r, result in zip(good, results, strict=True):
        log.info("%s: %s", settings.describe(r.claim.image_id, r.claim.file_name), result.label)
    log.info(
        "batch of %d: decode %.0f ms, forward %.0f ms, total %.0f ms",
        len(claims), waited_s * 1000.0, forward_s * 1000.0,
        (time.perf_counter() - started) * 1000.0,
    )
    return outcome


def _prediction_row(claim: Claim, result, models, per_image_ms: float,
                    heatmaps: dict[str, str]) -> dict:
    """What ``images.save_predictions`` stores for one image: the cascade's answer and the
    versions and thresholds that gave it."""
    infection = models.infection if result.p_virus is not None else None
    return dict(
        sha256=claim.sha256, pneumonia_model_id=models.pneumonia.model_id,
        infection_model_id=infection.model_id if infection else None,
        p_pneumonia=result.p_pneumonia, p_virus=result.p_virus, label=result.label,
        threshold=models.pneumonia.threshold,
        infection_threshold=infection.threshold if infection else None,
        inference_ms=per_image_ms, heatmap_path=heatmaps.get(claim.sha256),
    )


def _stage_two(good: list[_Read]):
    """Stage-2 pixels, decoded from the same checked bytes at stage 2's own input size when the
    image was read (resizing stage-1 pixels would feed pixels it never trained on)."""

    def pixels(indices: np.ndarray, size: int) -> np.ndarray:
        return np.stack([good[i].second for i in indices])

    return pixels


def _decode_and_classify(claims: list[Claim], settings: Settings, models
                         ) -> tuple[list[_Read], list[_Read], list, float, float]:
    """Decode in threads and classify in forward passes of ``CXR_BATCH_SIZE`` as the decoded
    images come in: every image is handed to the threads at once, so they decode the next ones
    while the model runs on these, and a GPU (or the other core) does not wait for the whole
    message to decode.

    Returns (every image read, in order; the good ones; their results; seconds spent waiting
    for decoding; seconds in forward passes)."""
    size = max(1, settings.batch_size)
    read: list[_Read] = []
    good: list[_Read] = []
    results: list = []
    waited_s = forward_s = 0.0
    budget = MemoryBudget(settings.decode_memory_mb * 1024 * 1024)
    pool = ThreadPoolExecutor(max_workers=max(1, min(decode_threads(), len(claims))))
    try:
        sizes = (models.pneumonia.input_size, models.infection.input_size
                 if models.infection is not None else models.pneumonia.input_size)
        pending = [pool.submit(_read_one, claim, settings, sizes, budget) for claim in claims]
        for start in range(0, len(claims), size):
            began = time.perf_counter()
            chunk = [future.result() for future in pending[start:start + size]]
            decoded = [r for r in chunk if r.pixels is not None]
            waited_s += time.perf_counter() - began
            read += chunk
            if decoded:
                began = time.perf_counter()
                results += classify_arrays(np.stack([r.pixels for r in decoded]),
                                           models.pneumonia, models.infection,
                                           _stage_two(decoded))
                forward_s += time.perf_counter() - began
                good += decoded
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return read, good, results, waited_s, forward_s


def _read_one(claim: Claim, settings: Settings, sizes: tuple[int, int], budget: MemoryBudget
              ) -> _Read:
    """Read, check and decode one archived file within the memory budget; its bytes are
    dropped once decoded (at both stages' sizes), so a message holds pixels, never files."""
    path = stored_file(settings, claim.stored_path)
    if path is None:
        return _Read(claim, missing=True)
    try:
        with open(path, "rb") as fh:
            return _read_opened(claim, fh, settings, sizes, budget)
    except FileNotFoundError:
        return _Read(claim, missing=True)
    except OSError as exc:
        return _Read(claim, rejected=f"cannot read the archived file: {exc.strerror or exc}")


def _read_opened(claim: Claim, fh: BinaryIO, settings: Settings, sizes: tuple[int, int],
                 budget: MemoryBudget) -> _Read:
    st_size = os.fstat(fh.fileno()).st_size
    if st_size > settings.max_file_bytes:
        return _Read(claim, rejected=f"file too large: {st_size:,} bytes (the limit, "
                     f"CXR_MAX_FILE_BYTES, is {settings.max_file_bytes:,})")
    head = fh.read(HEAD_BYTES)
    fmt = sniff_bytes(head)
    kept = st_size if fmt in SUPPORTED_FORMATS else len(head)
    decoding = max(decode_cost(head, s) for s in sizes) or 4 * kept
    cost = kept + max(kept, decoding)  # the bytes, and their one copy or the decoder's peak
    try:
        with budget.reserve(cost):
            data = read_image_bytes(fh, head, claim.sha256, keep_all=fmt == "DICOM",
                                    keep_head_only=fmt not in SUPPORTED_FORMATS)
            if data is None:
                return _Read(claim, rejected="the archived file changed after intake (its "
                             "SHA-256 no longer matches what was received); not classified")
            decoded = decode_data(data, sizes[0], settings.max_image_pixels,
                                  name=claim.file_name)
            second = decoded.pixels if sizes[1] == sizes[0] else decode_bytes(
                data, sizes[1], settings.max_image_pixels, name=claim.file_name)
            del data
        return _Read(claim, pixels=decoded.pixels, second=second,
                     identifiers=decoded.identifiers)
    except BadImageError as exc:
        return _Read(claim, rejected=str(exc), identifiers=exc.identifiers)


def read_image_bytes(fh: BinaryIO, head: bytes, sha256: str, keep_all: bool = False,
                     keep_head_only: bool = False) -> bytes | None:
    """The image's own bytes from an open file whose first bytes ``head`` were read: the whole
    file is hashed in chunks (None when it is not ``sha256``, what intake hashed), but only
    the bytes up to the image's end (JPEG EOI, PNG IEND) are kept; trailing data is dropped.
    A DICOM (``keep_all``) is kept whole; an unknown format (``keep_head_only``) only its head,
    which is all the decoder needs to name it."""
    digest = hashlib.sha256(head)
    finder = EndFinder(head)
    buf = bytearray(head)
    end = None if keep_all else finder.feed(buf)
    while chunk := fh.read(READ_CHUNK):
        digest.update(chunk)
        if end is None and not keep_head_only:
            buf += chunk
            if not keep_all and not finder.unknown:
                end = finder.feed(buf)
    if digest.hexdigest() != sha256:
        return None
    if end is not None:
        del buf[end:]
    return bytes(buf)


def _retry_missing(missing: list[Claim], settings: Settings) -> dict[int, str]:
    """An archived file that is not there may come back (a network filesystem blip): hand the
    image back and send it again later; only once its attempts are used up is it ``failed``."""
    if not missing:
        return {}
    from worker.broker import enqueue_batch

    reason = "the archived file is missing"
    spent = [c for c in missing if c.attempts >= settings.max_attempts]
    again = [c for c in missing if c.attempts < settings.max_attempts]
    with session_scope(settings.db_url) as session:
        for c in spent:
            images.mark_failed(session, c.image_id,
                               f"{reason} (gave up after {c.attempts} attempts)")
        images.requeue(session, [c.image_id for c in again], f"{reason}; will try again")
    outcome = dict.fromkeys((c.image_id for c in spent), "failed")
    for c in again:
        delay = min(MISSING_RETRY_MAX_SECONDS, 2 ** c.attempts)
        log.warning("%s: %s; trying again in %s s", settings.describe(c.image_id, c.file_name),
                    reason, delay)
        enqueue_batch([(c.image_id, c.file_name)], countdown=delay)
        outcome[c.image_id] = "retry"
    return outcome
