"""The input gate in serving: one forward pass, the gate, then the cascade on what passed.

A stage-1 bundle with a gate (``manifest.gate``) is run through its ``FeatureModel``, which
gives the penultimate features and the probability in one pass; the gate
(``trainer.model.gate``: file colour, pixel checks, layout, features) judges every image on
them, and only the images it passes go on to the cascade, which reuses that probability
(stage 2 never sees a refused image). A refused image gets no label: a ``GateRefused`` with
the reason a person can act on. Bundles without a gate take the old path unchanged. The worker,
``cxr classify`` and ``cxr explain --file`` all come through ``classify_gated``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from worker.classify.inference import (
    CascadeResult,
    StageModel,
    StagePixels,
    bucket_sizes,
    classify_arrays,
)


@dataclass(frozen=True)
class GateRefused:
    """An image the input gate refused: no label, a reason, and the learned gate's score."""

    refusal: Any  # trainer.model.refusal.Refusal
    gate_score: float | None = None
    label = None
    """No label, ever: callers that print results tell the two apart by it."""

    @property
    def reason(self) -> str:
        """What the ``error`` column says: the check, its reason and, where the reason does
        not already give them, the score and threshold."""
        r = self.refusal
        text = f"refused by the input gate ({r.check}): {r.reason}"
        if "threshold" not in r.reason and r.score is not None and r.threshold is not None:
            text += f" (score {r.score:.3g}, threshold {r.threshold:.3g})"
        return text


def stage_model(model_id: int, version: int, bundle) -> StageModel:
    """A StageModel with the bundle's gate and feature model when its manifest has a gate
    (a missing or altered gate file raises ModelNotFoundError, like a broken model)."""
    if not getattr(bundle.manifest, "gate", None):
        return StageModel(model_id, version, bundle)
    from trainer.model.gate_bundle import FeatureModel, load_gate

    return StageModel(model_id, version, bundle, FeatureModel(bundle), load_gate(bundle))


def features_in_buckets(runner, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``runner.predict`` over the power-of-two chunks the model was warmed up for."""
    features, proba, start = [], [], 0
    for size in bucket_sizes(len(batch)):
        f, p = runner.predict(batch[start:start + size])
        features.append(f)
        proba.append(p)
        start += size
    return np.concatenate(features), np.concatenate(proba)


def learned_verdicts(gate, features: np.ndarray, pixels: np.ndarray
                     ) -> tuple[list, np.ndarray]:
    """(the learned gates' refusal or None per image, the gate score): the score is the larger
    of the layout and feature scores, each over its threshold, so above 1 is refused whatever
    the model version."""
    f, lay = gate.scores(features, pixels)
    verdicts = [gate.layout.refusal(b) or gate.features.refusal(a)
                for a, b in zip(f, lay, strict=True)]
    ratio = np.maximum(np.asarray(f) / gate.features.threshold,
                       np.asarray(lay) / gate.layout.threshold)
    return verdicts, ratio


def screen_batch(stage: StageModel, batch: np.ndarray, colour: list | None = None
                 ) -> tuple[list, np.ndarray, np.ndarray]:
    """(refusal or None per image, gate scores, stage-1 p(class_names[1])) in one pass."""
    from trainer.model.gate import check_pixels

    features, proba = features_in_buckets(stage.runner, batch)
    learned, scores = learned_verdicts(stage.gate, features, batch)
    colour = colour or [None] * len(batch)
    verdicts = [c or check_pixels(px) or v
                for c, px, v in zip(colour, batch, learned, strict=True)]
    return verdicts, scores, proba


def _subset(stage_two: StagePixels | None, keep: np.ndarray) -> StagePixels | None:
    if stage_two is None:
        return None
    return lambda indices, feed: stage_two(keep[indices], feed)


def classify_gated(batch: np.ndarray, pneumonia: StageModel, infection: StageModel | None,
                   stage_two: StagePixels | None = None, colour: list | None = None,
                   classify=classify_arrays) -> list[CascadeResult | GateRefused]:
    """The gate, then ``classify`` (``classify_arrays``) on the images it passed, per image in
    batch order; without a gate exactly ``classify(batch, pneumonia, infection, stage_two)``.

    ``colour``: the file-colour verdict of each image (``check_file_colour``), which its
    decoded grey pixels cannot show."""
    batch = np.asarray(batch)
    if pneumonia.gate is None or not len(batch):
        return list(classify(batch, pneumonia, infection, stage_two))
    verdicts, scores, proba = screen_batch(pneumonia, batch, colour)
    keep = np.flatnonzero([v is None for v in verdicts])
    answers = iter(classify(batch[keep], pneumonia, infection, _subset(stage_two, keep),
                            first=proba[keep]) if keep.size else [])
    return [GateRefused(v, float(s)) if v is not None
            else replace(next(answers), gate_score=float(s))
            for v, s in zip(verdicts, scores, strict=True)]


def file_colour(paths: list[Path]) -> list:
    """``check_file_colour`` of each file (for one-off commands that hold paths)."""
    from trainer.model.gate import check_file_colour

    return [check_file_colour(p) for p in paths]
