"""The two-stage cascade and the per-process cache of production models.

``classify_arrays`` is batch-shaped: stage 1 runs on the whole batch, stage 2 once on the
stage-1 positives, each in power-of-two chunks so only a few input shapes ever occur.
``ModelCache`` loads the production bundles lazily (warming those shapes up) and reloads a
stage when the registry's production version changes (one small query per batch).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from db.exceptions import BadImageError
from db.vocabulary import POSITIVE_CLASS, Label, Stage, review_uncertain
from trainer.imaging.decode import SERVICE_RESIZE, Feed, decode_many
from trainer.model.cascade import cascade_labels, positive_probability, positive_threshold

log = logging.getLogger(__name__)

WARM_UP_BUDGET_S = 10.0

StagePixels = Callable[[np.ndarray, Feed], np.ndarray]
"""(indices into the batch, a stage's feed) -> those images' pixels as that stage takes them."""


@dataclass(frozen=True)
class StageModel:
    """A production bundle and the registry row it came from; with the bundle's input gate
    (``gate``) and the model giving features with the probability (``runner``) when it has
    one (``worker.classify.gating.stage_model``)."""

    model_id: int
    version: int
    bundle: Any  # trainer.model.bundle.LoadedBundle
    runner: Any = None  # trainer.model.gate_bundle.FeatureModel
    gate: Any = None  # trainer.model.gate.InputGate

    @property
    def calibration(self) -> dict:
        """The manifest's calibration (temperature, calibrated threshold, band), or {}."""
        return getattr(self.bundle.manifest, "calibration", None) or {}

    @property
    def threshold(self) -> float:
        """The decision threshold on served probabilities: the calibrated one when the bundle
        is calibrated (comparing calibrated probabilities with the raw threshold is wrong)."""
        if self.calibration:
            return float(self.calibration["threshold"])
        return float(self.bundle.manifest.threshold)

    @property
    def input_size(self) -> int:
        return int(self.bundle.manifest.input_size)

    @property
    def feed(self) -> Feed:
        """Size and resize method the model's pixels are decoded with."""
        return Feed(self.input_size, getattr(self.bundle.manifest, "resize", SERVICE_RESIZE))


@dataclass(frozen=True)
class Models:
    pneumonia: StageModel | None
    infection: StageModel | None
    shadow_pneumonia: StageModel | None = None
    """Shadow versions (``cxr models shadow``): run beside production, never shown."""
    shadow_infection: StageModel | None = None


@dataclass(frozen=True)
class CascadeResult:
    label: Label
    p_pneumonia: float
    p_virus: float | None
    review: str | None = None
    """``uncertain:<stage>`` when a calibrated probability lay in that stage's band."""
    gate_score: float | None = None


def bucket_sizes(n: int) -> list[int]:
    """``n`` as descending powers of two (13 -> [8, 4, 1]).

    The CPU kernels (oneDNN) are built once per input shape and the first call at a new batch
    size costs about as much as a whole batch, so every forward pass uses one of a few sizes,
    all warmed up when the model loads (``warm_up``), and no image is padded.
    """
    return [1 << bit for bit in range(n.bit_length() - 1, -1, -1) if n >> bit & 1]


def predict_in_buckets(bundle, batch: np.ndarray) -> np.ndarray:
    """``bundle.predict_proba`` over power-of-two chunks of ``batch``, in order."""
    if len(batch) <= 1:
        return np.asarray(bundle.predict_proba(batch)).reshape(-1)
    out, start = [], 0
    for size in bucket_sizes(len(batch)):
        out.append(np.asarray(bundle.predict_proba(batch[start:start + size])).reshape(-1))
        start += size
    return np.concatenate(out)


def warm_up(bundle, max_batch: int, budget_s: float = WARM_UP_BUDGET_S,
            predict: Callable[[np.ndarray], Any] | None = None) -> list[int]:
    """Run the bucket sizes up to ``max_batch`` once, smallest first, until ``budget_s`` is
    spent (a slow model is not held back for minutes); returns the sizes warmed. ``predict``:
    what serving calls instead of ``bundle.predict_proba`` (the gated feature model)."""
    size = int(bundle.manifest.input_size)
    predict = predict or bundle.predict_proba
    started = time.perf_counter()
    warmed, n = [], 1
    while n <= max(1, max_batch) and time.perf_counter() - started < budget_s:
        predict(np.zeros((n, size, size, 3), dtype=np.uint8))  # the dtype served
        warmed.append(n)
        n *= 2
    return warmed


def _positive(stage: StageModel, batch: np.ndarray, positive: str, proba=None
              ) -> tuple[np.ndarray, float, np.ndarray]:
    """(p(positive) per image, calibrated when the bundle is, the threshold on that
    probability, whether each lies in the stage's uncertain band). ``proba``: the model's
    p(class_names[1]) when already computed (the gate's forward pass)."""
    names = stage.bundle.manifest.class_names
    proba = predict_in_buckets(stage.bundle, batch) if proba is None else proba
    uncertain = np.zeros(len(proba), dtype=bool)
    if stage.calibration:
        from trainer.model.calibration import calibrate, in_band

        proba = calibrate(proba, stage.calibration["temperature"])
        uncertain = in_band(proba, stage.calibration["band"])
    return (positive_probability(proba, names, positive),
            positive_threshold(stage.threshold, names, positive), uncertain)


def stage_two_from_files(paths: Sequence[Path], max_pixels: int, threads: int = 1) -> StagePixels:
    """Stage-2 pixels for ``classify_arrays``: the images at ``paths`` (in batch order) decoded
    again at stage 2's input size and resize method, so each stage sees the pixels it was
    trained on. A file that decoded once and fails now raises its BadImageError."""

    def pixels(indices: np.ndarray, feed: Feed) -> np.ndarray:
        decoded = decode_many([paths[i] for i in indices], feed.size, max_pixels,
                              threads=threads, resize=feed.resize)
        for result in decoded:
            if isinstance(result, BadImageError):
                raise result
        return np.stack([result.pixels for result in decoded])

    return pixels


def classify_arrays(
    batch: np.ndarray,
    pneumonia: StageModel,
    infection: StageModel | None,
    stage_two: StagePixels | None = None,
    first: np.ndarray | None = None,
) -> list[CascadeResult]:
    """Stage 1 on every image; stage 2 on the stage-1 positives only, in one call each; the
    labels come from the cascade rule the trainer evaluates with (``trainer.model.cascade``).

    ``batch`` holds the images as stage 1 takes them (its ``feed``). When stage 2 takes another
    size or resize method, ``stage_two(indices, feed)`` gives those images its way
    (``stage_two_from_files``): resizing stage-1 pixels would feed stage 2 pixels it never saw
    in training. ``first``: stage 1's p(class_names[1]) for ``batch`` when the gate's pass
    already gave it (no second forward pass). A calibrated stage's probability in its band
    keeps its label and gets ``review`` = ``uncertain:<stage>`` (stage 1's first).
    """
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise ValueError(f"expected (N, S, S, 3) pixels, got shape {batch.shape}")
    p_pneu, t_pneu, unsure = _positive(pneumonia, batch, POSITIVE_CLASS[Stage.PNEUMONIA], first)
    p_virus = np.full(len(batch), np.nan)
    t_virus = None
    review: list[str | None] = [review_uncertain(Stage.PNEUMONIA) if u else None for u in unsure]
    positives = np.flatnonzero(p_pneu >= t_pneu)
    if infection is not None and positives.size:
        feed = infection.feed
        if feed == pneumonia.feed and batch.shape[1:3] == (feed.size, feed.size):
            second = batch[positives]
        elif stage_two is None:
            raise ValueError(f"stage 2 takes {feed.size} px images resized by {feed.resize} and "
                             "no stage_two pixels were given")
        else:
            second = stage_two(positives, feed)
        p_virus[positives], t_virus, unsure = _positive(infection, second,
                                                        POSITIVE_CLASS[Stage.INFECTION])
        for i in positives[unsure]:
            review[i] = review[i] or review_uncertain(Stage.INFECTION)
    labels = cascade_labels(p_pneu, p_virus, t_pneu, t_virus)
    return [
        CascadeResult(label, float(p1), None if np.isnan(p2) else float(p2), flag)
        for label, p1, p2, flag in zip(labels, p_pneu, p_virus, review, strict=True)
    ]


def production_models(models_dir: Path, db_url: str) -> Models:
    """The production models now, for a one-off command; no pneumonia model is an error that
    says how to get one."""
    from db.exceptions import ModelNotFoundError
    from db.session import session_scope

    with session_scope(db_url) as session:
        models = ModelCache(models_dir).current(session)
    if models.pneumonia is None:
        raise ModelNotFoundError(
            "no production pneumonia model; train one (cxr train) or promote one "
            "(cxr models promote pneumonia N)"
        )
    return models


def classify_file(path: Path, models: Models, max_pixels: int
                  ) -> tuple[np.ndarray, StagePixels, Any]:
    """One file through the gate and the cascade, as the worker does it: (stage-1 pixels,
    stage-2 pixels, a CascadeResult or, when the input gate refused it, a
    ``gating.GateRefused``). Raises BadImageError or OSError for a file that cannot be
    decoded."""
    from trainer.imaging.decode import decode_image
    from worker.classify.gating import classify_gated, file_colour

    feed = models.pneumonia.feed
    pixels = decode_image(path, feed.size, max_pixels, feed.resize)
    stage_two = stage_two_from_files([path], max_pixels)
    colour = file_colour([Path(path)]) if models.pneumonia.gate is not None else None
    result = classify_gated(pixels[None], models.pneumonia, models.infection, stage_two,
                            colour)[0]
    return pixels, stage_two, result


def _check_registered_bytes(directory: Path, row) -> None:
    """Refuse a bundle whose files are not the ones registered (edited, swapped, half-copied):
    the registry's version number would otherwise name predictions another model made."""
    from db.exceptions import ModelNotFoundError
    from trainer.model.bundle import bundle_sha256

    if row.bundle_sha256 is None:
        return
    try:
        actual = bundle_sha256(directory)
    except OSError as exc:
        raise ModelNotFoundError(f"model {row.name}: cannot read its bundle ({exc})") from None
    if actual != row.bundle_sha256:
        raise ModelNotFoundError(
            f"model {row.name}: the files in {directory} are not the ones registered (SHA-256 "
            f"{actual[:12]}..., registered {row.bundle_sha256[:12]}...); restore them or "
            "promote another version"
        )


def load_registered(models_dir: Path, row) -> StageModel:
    """The bundle of a registered version (``row``, a registry row), checked against its
    registered hash: for explaining a prediction with the models that made it."""
    from trainer.model.bundle import load_bundle
    from worker.classify.gating import stage_model

    directory = Path(models_dir) / row.bundle_path
    _check_registered_bytes(directory, row)
    return stage_model(row.id, row.version, load_bundle(directory))


class ModelCache:
    """Production (and shadow) models for this process, reloaded when the registry says they
    changed."""

    def __init__(self, models_dir: Path, loader=None, warm_batch: int = 0):
        self.models_dir = Path(models_dir)
        self._loader = loader
        self.warm_batch = warm_batch
        self._loaded: dict[str, StageModel] = {}
        self._failed: dict[str, int] = {}
        self._lock = threading.Lock()
        self._configured = False

    def _load(self, row) -> StageModel:
        if self._loader is None:
            if not self._configured:
                from trainer.model.runtime import configure_backend, describe_device
                from worker.classify.celery_app import THREADS_ENV

                configure_backend(int(os.environ.get(THREADS_ENV, "0") or 0))
                log.info("%s", describe_device())
                self._configured = True
            from trainer.model.bundle import load_bundle

            self._loader = load_bundle
        directory = self.models_dir / row.bundle_path
        _check_registered_bytes(directory, row)
        from worker.classify.gating import stage_model

        stage = stage_model(row.id, row.version, self._loader(directory))
        log.info("loaded model %s%s", row.name, " with its input gate" if stage.gate else "")
        if self.warm_batch > 0:
            started = time.perf_counter()
            sizes = warm_up(stage.bundle, self.warm_batch,
                            predict=stage.runner.predict if stage.runner else None)
            log.info("warmed up model %s for batch sizes %s in %.1f s", row.name, sizes,
                     time.perf_counter() - started)
        return stage

    def _load_shadow(self, key: str, row) -> None:
        """A shadow that cannot load is left out (once, with a warning): it never stops
        production."""
        self._loaded.pop(key, None)
        if self._failed.get(key) == row.id:
            return
        try:
            self._loaded[key] = self._load(row)
        except Exception as exc:
            self._failed[key] = row.id
            log.warning("shadow model %s not loaded, production goes on without it: %s",
                        row.name, exc)

    def current(self, session) -> Models:
        """The production and shadow models now; loads only what changed since the last call."""
        from db import registry

        wanted = {stage: (model_id, registry.get_production)
                  for stage, model_id in registry.production_ids(session).items()}
        wanted.update({f"shadow-{stage}": (model_id, registry.get_shadow)
                       for stage, model_id in registry.shadow_ids(session).items()})
        with self._lock:
            for key in list(self._loaded):
                if key not in wanted:
                    del self._loaded[key]
            for key, (model_id, lookup) in wanted.items():
                have = self._loaded.get(key)
                if have is None or have.model_id != model_id:
                    row = lookup(session, key.removeprefix("shadow-"))
                    if row is None:
                        self._loaded.pop(key, None)
                    elif key.startswith("shadow-"):
                        self._load_shadow(key, row)
                    else:
                        self._loaded[key] = self._load(row)
            get = self._loaded.get
            return Models(get(Stage.PNEUMONIA.value), get(Stage.INFECTION.value),
                          get(f"shadow-{Stage.PNEUMONIA.value}"),
                          get(f"shadow-{Stage.INFECTION.value}"))
