"""Shadow versions: a candidate runs beside production on the very pixels production was
given, in the same batch, and its answers are stored but never shown.

A stage-1 shadow takes every image stage 1 took (one more stage-1 forward pass); a stage-2
shadow takes the images production's stage 1 sent on (one more stage-2 pass on those), so its
prediction pairs production's stage 1 with the candidate's stage 2. A shadow whose feed (input
size, resize) differs from production's would need another decode: it is skipped, with a
warning, rather than fed pixels it was not trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from db.vocabulary import POSITIVE_CLASS, Label, Stage
from trainer.model.cascade import cascade_labels
from worker.classify.inference import (
    CascadeResult,
    Models,
    StageModel,
    StagePixels,
    _positive,
    classify_arrays,
)

log = logging.getLogger(__name__)
_warned: set[int] = set()


@dataclass(frozen=True)
class ShadowAnswer:
    """A shadow's answer for one image of the batch (``index`` into the batch)."""

    index: int
    result: CascadeResult
    pneumonia: StageModel
    infection: StageModel | None


def _fits(shadow: StageModel, production: StageModel | None, feed) -> bool:
    if shadow.feed == feed:
        return True
    if shadow.model_id not in _warned:
        _warned.add(shadow.model_id)
        log.warning("shadow model v%s takes %s px images (%s) but production's pixels are %s px "
                    "(%s): not run; shadow a version with the same input", shadow.version,
                    shadow.feed.size, shadow.feed.resize, feed.size, feed.resize)
    return False


def run_shadows(batch: np.ndarray, models: Models, results: list[CascadeResult],
                stage_two: StagePixels, offset: int = 0) -> list[ShadowAnswer]:
    """The shadows' answers for ``batch`` (stage-1 pixels) whose production answers are
    ``results``; ``stage_two`` gives the stage-2 pixels production used; indices are shifted by
    ``offset`` (the batch's place in the message)."""
    out: list[ShadowAnswer] = []
    first, second = models.shadow_pneumonia, models.shadow_infection
    if first is not None and _fits(first, models.pneumonia, models.pneumonia.feed):
        for i, result in enumerate(classify_arrays(batch, first, None)):
            out.append(ShadowAnswer(offset + i, result, first, None))
    stage_two_feed = (models.infection or models.pneumonia).feed
    if second is not None and _fits(second, models.infection, stage_two_feed):
        sent = np.array([i for i, r in enumerate(results) if r.label != Label.NORMAL], dtype=int)
        if sent.size:
            out += _stage_two_shadow(second, models.pneumonia, results, sent,
                                     stage_two(sent, stage_two_feed), offset)
    return out


def _stage_two_shadow(shadow: StageModel, pneumonia: StageModel, results: list[CascadeResult],
                      sent: np.ndarray, pixels: np.ndarray, offset: int) -> list[ShadowAnswer]:
    """The cascade with production's stage 1 and the shadow's stage 2, on the images
    production's stage 1 sent to stage 2."""
    p_virus, t_virus, _ = _positive(shadow, pixels, POSITIVE_CLASS[Stage.INFECTION])
    p_pneu = np.array([results[i].p_pneumonia for i in sent])
    t_pneu = 0.0  # these images are past stage 1 already: only stage 2 decides
    labels = cascade_labels(p_pneu, p_virus, t_pneu, t_virus)
    return [ShadowAnswer(offset + int(i), CascadeResult(label, float(p1), float(p2)), pneumonia,
                         shadow)
            for i, label, p1, p2 in zip(sent, labels, p_pneu, p_virus, strict=True)]


def shadow_row(sha256: str, answer: ShadowAnswer, per_image_ms: float | None) -> dict:
    """What ``predictions.save_predictions`` stores for a shadow's answer."""
    infection = answer.infection
    return dict(
        sha256=sha256, pneumonia_model_id=answer.pneumonia.model_id,
        infection_model_id=infection.model_id if infection else None,
        p_pneumonia=answer.result.p_pneumonia, p_virus=answer.result.p_virus,
        label=answer.result.label, threshold=answer.pneumonia.threshold,
        infection_threshold=infection.threshold if infection else None,
        inference_ms=per_image_ms,
    )
