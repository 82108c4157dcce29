"""Re-scoring past images: the same reading, batching and cascade as a live delivery
(``worker.classify.batch``), for images already ``done``, on the lower-priority queue.

Idempotent: an image whose content the production versions already predicted is relinked to
that prediction without being read; the prediction upsert keeps one row per content and
versions however often a message is delivered. A file that cannot be read now keeps its old
answer and is recorded in the job as skipped, never moved to ``rejected/``.
"""

from __future__ import annotations

import logging

from db import predictions
from db import rescore_jobs as jobs
from db.predictions import Answer
from db.session import session_scope
from worker.classify.batch import (
    _prediction_row,
    draw_heatmaps,
    read_and_classify,
)
from worker.classify.inference import ModelCache
from worker.classify.shadow import shadow_row
from worker.settings import Settings

log = logging.getLogger(__name__)


def rescore_images(image_ids: list[int], job_id: int, settings: Settings, cache: ModelCache
                   ) -> dict[str, int]:
    """Re-classify the images among ``image_ids`` that job ``job_id`` still needs with the
    production models now; returns how many were relinked to an existing prediction,
    classified, or skipped."""
    with session_scope(settings.db_url) as session:
        models = cache.current(session)
        if models.pneumonia is None:
            raise RuntimeError("no production pneumonia model: re-score waits for one")
        wanted = jobs.still_pending(session, jobs.get_job(session, job_id), image_ids)
        claims = jobs.done_claims(session, wanted)
        infection = models.infection.model_id if models.infection else None
        known = predictions.current_predictions(session, [c.sha256 for c in claims],
                                                models.pneumonia.model_id, infection)
        reused = [(c.image_id, known[c.sha256]) for c in claims if c.sha256 in known]
        jobs.relink(session, reused)
    todo = [c for c in claims if c.sha256 not in known]
    if not todo:
        return {"reused": len(reused)}
    run = read_and_classify(todo, settings, models)
    heatmaps = draw_heatmaps(run, settings, models)
    per_image_ms = run.forward_s * 1000.0 / max(1, len(run.good))
    rows = [_prediction_row(r.claim, result, models, per_image_ms, heatmaps)
            for r, result in zip(run.good, run.results, strict=True)]
    shadows = [Answer(run.good[s.index].claim.image_id,
                      shadow_row(run.good[s.index].claim.sha256, s, None)) for s in run.shadow]
    skipped = {r.claim.image_id: r.rejected or "its archived file is missing"
               for r in run.read if r.pixels is None}
    with session_scope(settings.db_url) as session:
        ids = predictions.save_predictions(session, rows)
        jobs.relink(session, [(r.claim.image_id, p) for r, p in zip(run.good, ids, strict=True)])
        shadow_ids = predictions.save_predictions(session, [s.row for s in shadows])
        predictions.link_roles(session, [(s.image_id, p, predictions.Role.SHADOW)
                                         for s, p in zip(shadows, shadow_ids, strict=True)])
        jobs.skip(session, job_id, skipped)
    for image_id, reason in skipped.items():
        log.warning("image %s not re-scored, it keeps its answer: %s", image_id, reason)
    log.info("re-score of %d image(s): %d reused, %d classified, %d skipped", len(image_ids),
             len(reused), len(run.good), len(skipped))
    return {"reused": len(reused), "classified": len(run.good), "skipped": len(skipped)}
