"""Heatmaps of results: the Grad-CAM of the stage that decided each label, drawn with what the
model said, and (with ``CXR_HEATMAPS``) stored for every pneumonia-positive result of a batch.

Stage 1 decides NORMAL and PNEUMONIA, stage 2 decides BACTERIA and VIRUS; each stage's map is
computed on the pixels that stage classified (stage 2 at its own input size, decoded from the
same bytes). A heatmap belongs to a prediction: its file is named by content and models
(``worker.files.storage.heatmap_relpath``). Heatmaps never fail a batch: an error is logged and the
results are written without them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from db.exceptions import ExplainError
from db.vocabulary import DISCLAIMER, Label, Stage
from worker.classify.inference import CascadeResult, Models, StageModel, StagePixels, bucket_sizes
from worker.settings import Settings

log = logging.getLogger(__name__)

_warned: weakref.WeakSet = weakref.WeakSet()
"""Errors already logged: a model's ExplainError is one object per loaded bundle
(``trainer.model.explain.explainer_for``), so each loaded model is reported once."""


@dataclass(frozen=True)
class Heatmap:
    """One result's Grad-CAM: the pixels its deciding stage classified and the map over them."""

    pixels: np.ndarray
    cam: np.ndarray
    stage: Stage
    model: StageModel
    layer: str


def deciding_stage(label: str) -> Stage:
    """The stage whose answer is the label: stage 2 for BACTERIA and VIRUS, else stage 1."""
    return Stage.INFECTION if label in (Label.BACTERIA, Label.VIRUS) else Stage.PNEUMONIA


def explain_results(
    models: Models, results: Sequence[CascadeResult], pixels: np.ndarray,
    stage_two: StagePixels | None, indices: Sequence[int] | None = None,
) -> dict[int, Heatmap]:
    """Heatmaps for ``results[i]`` (every i in ``indices``, default all), whose stage-1 pixels
    are ``pixels[i]``; ``stage_two(indices, feed)`` gives stage-2 pixels decoded its way."""
    from trainer.model.explain import explainer_for, grad_cam

    chosen = list(range(len(results))) if indices is None else list(indices)
    out: dict[int, Heatmap] = {}
    for stage in (Stage.PNEUMONIA, Stage.INFECTION):
        picked = np.asarray([i for i in chosen if deciding_stage(results[i].label) == stage],
                            dtype=int)
        if not picked.size:
            continue
        model = models.pneumonia if stage == Stage.PNEUMONIA else models.infection
        if model is None:
            raise ExplainError(f"no {stage} model to explain {results[picked[0]].label}")
        feed = model.feed
        same = models.pneumonia is not None and feed == models.pneumonia.feed
        if same and pixels.shape[1:3] == (feed.size, feed.size):
            batch = np.asarray(pixels)[picked]
        elif stage_two is None:
            raise ExplainError(f"stage 2 takes {feed.size} px images and no pixels were given")
        else:
            batch = stage_two(picked, feed)
        explainer = explainer_for(model.bundle)
        classes = [explainer.class_index(results[i].label) for i in picked]
        start = 0
        for n in bucket_sizes(len(picked)):
            chunk = slice(start, start + n)
            cams = grad_cam(explainer, batch[chunk], classes[chunk])
            for i, image, cam in zip(picked[chunk], batch[chunk], cams, strict=True):
                out[int(i)] = Heatmap(image, cam, stage, model, explainer.layer)
            start += n
    return out


def describe(result: CascadeResult, heatmap: Heatmap, subject: str | None = None
             ) -> tuple[str, list[str]]:
    """(title, margin lines) of a heatmap picture: the answer, the probabilities, the model
    that decided and where the map comes from. Never a file name (they carry patient names)."""
    lines = [f"p(pneumonia) {result.p_pneumonia:.3f}"]
    if result.p_virus is not None:
        lines.append(f"p(virus | pneumonia) {result.p_virus:.3f}")
    stage_number = 1 if heatmap.stage == Stage.PNEUMONIA else 2
    lines += [
        "",
        f"Grad-CAM: where stage {stage_number} found {result.label}",
        f"model {heatmap.stage}/v{heatmap.model.version}, {heatmap.model.input_size} px, "
        f"layer {heatmap.layer}",
    ]
    if subject:
        lines.append(subject)
    lines += ["", DISCLAIMER]
    return str(result.label), lines


def render(result: CascadeResult, heatmap: Heatmap, subject: str | None = None) -> bytes:
    """The PNG of one heatmap (see ``trainer.model.overlay``)."""
    from trainer.model.overlay import render_overlay

    title, lines = describe(result, heatmap, subject)
    return render_overlay(heatmap.pixels, heatmap.cam, title, lines)


def write_heatmaps(
    settings: Settings, models: Models, results: Sequence[CascadeResult], pixels: np.ndarray,
    sha256s: Sequence[str], stage_two: StagePixels | None,
) -> dict[str, str]:
    """Draw and store the heatmap of every pneumonia-positive result of a batch; returns
    sha256 -> its path as recorded (relative to the data dir). Logs and skips on any error."""
    from worker.files.storage import heatmap_relpath, write_private

    positives = [i for i, r in enumerate(results) if r.label != Label.NORMAL]
    if not positives:
        return {}
    started = time.perf_counter()
    written: dict[str, str] = {}
    try:
        heatmaps = explain_results(models, results, np.asarray(pixels), stage_two, positives)
        for i, heatmap in heatmaps.items():
            infection = models.infection if results[i].p_virus is not None else None
            relpath = heatmap_relpath(sha256s[i], models.pneumonia.model_id,
                                      infection.model_id if infection else None)
            written[sha256s[i]] = write_private(settings, relpath, render(results[i], heatmap))
    except ExplainError as exc:
        if exc not in _warned:
            _warned.add(exc)
            log.warning("no heatmaps (CXR_HEATMAPS): %s", exc)
        return written
    except Exception as exc:
        log.warning("heatmaps failed for this batch, results are written without them: %s: %s",
                    type(exc).__name__, exc)
        return written
    log.info("heatmaps: %d of %d images in %.0f ms", len(written), len(results),
             (time.perf_counter() - started) * 1000.0)
    return written
