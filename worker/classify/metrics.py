"""Prometheus instruments of the worker: images by outcome, refusals by kind, and how long
reading, the forward pass and the whole trip took.

Multiprocess-safe: with ``PROMETHEUS_MULTIPROC_DIR`` set (``cxr up`` and ``cxr worker`` set
it before this is imported) every prefork child writes its own files, which
``worker.ops.metrics_server`` merges when scraped. Names follow Prometheus's guide: base units,
``_total`` counters, no ids or file names as labels (label values are a few statuses, labels,
model versions and refusal kinds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

IMAGES = Counter("cxr_images", "Images that reached a final status, by status, label and the "
                 "pneumonia model version that answered", ["status", "label", "model_version"])
REFUSALS = Counter("cxr_refusals", "Images the worker refused, by kind of reason", ["reason"])
DROP_TO_DONE = Histogram(
    "cxr_drop_to_done_seconds", "From intake to the recorded answer, per image",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600))
DECODE = Histogram("cxr_decode_seconds", "Reading, hash check and decoding of one image",
                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
FORWARD = Histogram("cxr_forward_seconds", "Forward passes (both stages) per image",
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
REVIEW_FLAGS = Counter("cxr_review_flags", "Answers flagged for a person: uncertain (per stage) "
                       "or out of scope (refused by the input gate)", ["flag"])
BATCH = Histogram("cxr_batch_images", "Images classified together (one claimed group)",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

REASON_KINDS = (
    ("input_gate", ("refused by the input gate",)),
    ("link", ("symbolic link", "hard link")),
    ("changed", ("archived file changed",)),
    ("too_large", ("too large", "pixels", "bomb")),
    ("corrupt", ("truncated", "corrupt", "ends early", "bad crc")),
    ("not_an_image", ("not an image", "not a jpeg", "unsupported format", "unrecognised")),
    ("not_a_chest_xray", ("modality", "view", "lateral", "frame", "photometric", "dicom")),
    ("unreadable", ("cannot read", "permission", "empty file", "vanished")),
)
"""A refusal's reason, a free text, becomes one of these kinds (else ``other``); the first
match wins."""


def enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def reason_kind(reason: str) -> str:
    text = reason.lower()
    return next((kind for kind, words in REASON_KINDS if any(w in text for w in words)),
                "other")


def timed(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)``, its duration observed as one image's decode time."""
    started = time.perf_counter()
    try:
        return read(*args)
    finally:
        DECODE.observe(time.perf_counter() - started)


def observe_batch(answers: list[tuple[str, str]], refusals: list[str], forward_s: float,
                  batch_images: int, received: dict[int, datetime], ids: list[int],
                  flags: list[str] = ()) -> None:
    """One recorded batch: ``answers`` as (label, model version), the refusals' reasons, the
    forward time, the group's size, when each answered image (``ids``) was received, and the
    review flags given (``uncertain:<stage>``, ``out_of_scope``)."""
    for flag in flags:
        REVIEW_FLAGS.labels(flag).inc()
    for label, version in answers:
        IMAGES.labels("done", label, version).inc()
    for reason in refusals:
        IMAGES.labels("rejected", "", "").inc()
        REFUSALS.labels(reason_kind(reason)).inc()
    for _ in answers:
        FORWARD.observe(forward_s / max(1, len(answers)))
    if batch_images:
        BATCH.observe(batch_images)
    now = datetime.now(UTC)
    for image_id in ids:
        if image_id in received:
            DROP_TO_DONE.observe(max(0.0, (now - received[image_id]).total_seconds()))


def observe_failed(count: int) -> None:
    if count:
        IMAGES.labels("failed", "", "").inc(count)


def observe_intake(db_url: str, results: list[Any]) -> None:
    """Images intake finished itself (``IntakeResult``s done or rejected: a content already
    classified, a refused entry), counted like the worker's."""
    ids = [r.image_id for r in results if r.status in ("done", "rejected")]
    if not ids or not enabled():
        return
    from db.monitoring import final_rows
    from db.session import session_scope

    with session_scope(db_url) as session:
        rows = final_rows(session, ids)
    for status, label, version, error in rows:
        if status == "done":
            IMAGES.labels("done", label or "", f"pneumonia/v{version}" if version else "").inc()
        elif status == "rejected":
            IMAGES.labels("rejected", "", "").inc()
            REFUSALS.labels(reason_kind(error or "")).inc()
