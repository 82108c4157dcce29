"""The input gate: "this is not something I can read", decided before any label is given.

Two layers, cheapest first, each refusal with its own reason a person can act on:

* Pixel checks (``check_pixels``) on the decoded image: nearly constant, a text page or
  screenshot, an inverted (negative) chest film. The decoder reduces every file to luminance, so
  a colour photograph cannot be seen in its pixels: ``check_file_colour`` looks at the file's
  own colours (a small draft decode) and ``check_colour`` at any RGB array.
* A learned out-of-distribution score on the stage-1 model's own penultimate features
  (``Gate``): in the span of the top principal components, a Mahalanobis distance under a
  Ledoit-Wolf shrunk covariance; outside it, the residual energy. Each term is scaled to mean 1
  on the training features and the two are added. Mahalanobis on a classifier's features is
  what separates non-chest from chest radiographs in the literature (FRODO, arXiv 1907.01253),
  where the classifier's own confidence does no better than chance; the PCA keeps the
  covariance estimable from a small set (k = min(32, n/3) dimensions) and the residual term
  catches inputs that leave that span entirely, which an in-span distance alone cannot see.
  The threshold is chosen on validation images the gate was not fitted on (``fit_gate``), or
  by cross-fitting on a small reference (``trainer.model.gate_bundle``).

DICOM MONOCHROME1 is already inverted by the decoder, so a correctly labelled film is never
"inverted" here; only a negative written as MONOCHROME2 (or a JPEG of one) is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONSTANT_RANGE = 12.0
"""Grey levels between the 1st and 99th percentile below which an image is "nearly constant"."""

TEXT_BLANK_LINES = 0.12
"""Share of rows (or columns) that are blank background above which an image with a bright
(>= 170) modal grey is a page: margins and the gaps between lines of text. A radiograph has
body or air in every row; the synthetic chest films reach at most 0.09 (with a dark mode)."""

INVERTED_MARGIN = 10.0
"""Grey levels by which the lung fields must be brighter than the mediastinum to call a frontal
film inverted (a normal film has them 40-120 levels darker)."""

COLOUR_SPREAD = 12.0
"""Spread of chroma (sqrt of the variances of R-G and (R+G)/2-B, 0-255 scale) above which an
image is a colour photograph. A uniform tint (sepia, a blue cast) has no spread and passes."""


@dataclass(frozen=True)
class Refusal:
    """Why an image gets no label: ``check`` names the test, ``reason`` says what to do."""

    check: str
    reason: str
    score: float | None = None
    threshold: float | None = None


def _grey(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got shape {arr.shape}")
    return arr.astype(np.float32)


def check_constant(grey: np.ndarray) -> Refusal | None:
    """A blank, black or flat image (a failed export, a placeholder)."""
    lo, hi = np.percentile(grey, [1, 99])
    spread = float(hi - lo)
    if spread >= CONSTANT_RANGE:
        return None
    return Refusal("constant", f"nearly constant image (grey levels span {spread:.0f} of 255):"
                   " a blank or failed export; resend the original image", spread,
                   CONSTANT_RANGE)


def blank_line_share(grey: np.ndarray) -> tuple[float, float]:
    """(modal grey, share of rows or columns, whichever is larger, with >= 90 % of their
    pixels within 15 grey levels of it)."""
    hist = np.bincount(np.clip(grey, 0, 255).astype(np.int64).ravel(), minlength=256)
    mode = float(np.argmax(hist))
    near = np.abs(grey - mode) <= 15
    rows, cols = (near.mean(axis=1) >= 0.9).mean(), (near.mean(axis=0) >= 0.9).mean()
    return mode, float(max(rows, cols))


def check_text(grey: np.ndarray) -> Refusal | None:
    """A scanned page or a screenshot: a flat bright background, blank margins and line gaps,
    and darker strokes."""
    mode, blank = blank_line_share(grey)
    if mode < 170 or blank < TEXT_BLANK_LINES or float(grey.min()) > mode - 40:
        return None
    return Refusal("text", f"looks like a page of text or a screenshot ({blank:.0%} of its lines"
                   " are blank bright background), not a radiograph; send the image itself,"
                   " not a document about it", blank, TEXT_BLANK_LINES)


def inversion_contrast(grey: np.ndarray) -> float:
    """Median grey of the lung fields minus that of the mediastinum band (0-255 scale).

    Frontal films have dark lungs either side of a bright spine and heart, so this is strongly
    negative; a negative image makes it positive. Medians over broad bands keep a dense
    consolidation, a few degrees of rotation or a shifted patient from flipping the sign.
    """
    h, w = grey.shape
    rows = slice(int(0.25 * h), int(0.65 * h))
    centre = grey[rows, int(0.45 * w):int(0.55 * w)]
    left = grey[rows, int(0.15 * w):int(0.33 * w)]
    right = grey[rows, int(0.67 * w):int(0.85 * w)]
    lungs = min(float(np.median(left)), float(np.median(right)))
    return lungs - float(np.median(centre))


def check_inverted(grey: np.ndarray) -> Refusal | None:
    """A negative: lungs brighter than the mediastinum."""
    contrast = inversion_contrast(grey)
    if contrast <= INVERTED_MARGIN:
        return None
    return Refusal("inverted", "looks inverted (a negative: the lungs are brighter than the"
                   f" spine by {contrast:.0f} grey levels); export the image as displayed"
                   " (MONOCHROME2, bones white) and resend", contrast, INVERTED_MARGIN)


def colour_spread(rgb: np.ndarray) -> float:
    """Spread of chroma of an (H, W, 3) image, 0 for any grey or uniformly tinted image."""
    arr = np.asarray(rgb, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return 0.0
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    return float(math.hypot(float(np.std(r - g)), float(np.std((r + g) / 2 - b))))


def check_colour(rgb: np.ndarray) -> Refusal | None:
    """A colour photograph (a phone picture of anything, a clinical photo)."""
    spread = colour_spread(rgb)
    if spread <= COLOUR_SPREAD:
        return None
    return Refusal("colour", f"a colour photograph (colour spread {spread:.0f}, radiographs"
                   f" have none above {COLOUR_SPREAD:.0f}); send the radiograph file itself",
                   spread, COLOUR_SPREAD)


def check_file_colour(path: Path, side: int = 64) -> Refusal | None:
    """``check_colour`` on a JPEG or PNG file's own colours, decoded small (draft mode).

    Call it after the file decoded (so it is known to be a sound JPEG/PNG); a DICOM or a file
    Pillow cannot open returns None: the decoder has already said what was wrong with it.
    """
    from PIL import Image

    try:
        with Image.open(path, formats=["JPEG", "PNG"]) as img:
            if img.mode in ("L", "LA", "I", "I;16", "1", "F"):
                return None
            img.draft("RGB", (side, side))
            img = img.convert("RGB")
            img.thumbnail((side, side))
            return check_colour(np.asarray(img))
    except Exception:  # not ours to judge: decode_image reports bad files
        return None


def check_pixels(pixels: np.ndarray) -> Refusal | None:
    """The cheap checks on decoded pixels ((H, W, 3) uint8 as the decoder gives, or grey), in
    order constant, inverted, text, colour; the first that fires, or None."""
    grey = _grey(pixels)
    for check in (check_constant, check_inverted, check_text):
        refusal = check(grey)
        if refusal is not None:
            return refusal
    return check_colour(pixels) if np.ndim(pixels) == 3 else None


# --- the learned gate ----------------------------------------------------------------------


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of rows ``x`` (already centred) and its shrinkage in
    [0, 1] (Ledoit & Wolf 2004: the shrinkage towards a scaled identity that minimises the
    expected Frobenius loss, estimated from the data)."""
    n, p = x.shape
    s = x.T @ x / n
    mu = float(np.trace(s)) / p
    delta = float(((s - mu * np.eye(p)) ** 2).sum()) / p
    beta = (float((np.einsum("ij,ij->i", x, x) ** 2).sum()) / n - float((s ** 2).sum())) / (n * p)
    shrink = 0.0 if delta <= 0 else min(1.0, max(0.0, beta / delta))
    return shrink * mu * np.eye(p) + (1 - shrink) * s, shrink


def gate_dims(n: int, d: int, cap: int = 32) -> int:
    """Principal components a set of ``n`` feature vectors supports: min(cap, n // 3, d - 1),
    at least 1 (a covariance of k dimensions wants several times k samples)."""
    return max(1, min(cap, n // 3, d - 1))


@dataclass
class Gate:
    """A fitted out-of-distribution score on penultimate features; larger = less familiar.

    ``score`` = (Mahalanobis^2 in the top-k PCA span) / k + (residual energy) / (its training
    mean): about 2 for a typical training image. ``threshold`` is on that score.
    """

    mean: np.ndarray
    components: np.ndarray
    precision: np.ndarray
    residual_scale: float
    threshold: float = float("inf")
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Score for each row of (N, D) features (a 4-D feature map is averaged over space)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim > 2:
            f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(axis=1)
        centred = f - self.mean
        z = centred @ self.components
        maha = np.einsum("ij,jk,ik->i", z, self.precision, z) / self.dims
        residual = ((centred - z @ self.components.T) ** 2).sum(axis=1) / self.residual_scale
        return (maha + residual).astype(np.float32)

    def refusal(self, score: float) -> Refusal | None:
        """The refusal for one image's score, or None when it passes."""
        if not score > self.threshold:
            return None
        return Refusal("out_of_scope", f"does not look like a frontal chest X-ray this model"
                       f" was trained on (unfamiliarity score {score:.2f}, threshold"
                       f" {self.threshold:.2f}); check the body part, view and export",
                       float(score), float(self.threshold))


def fit_features(features: np.ndarray, cap: int = 32) -> Gate:
    """A Gate (threshold still infinite) fitted to (N, D) in-distribution features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim > 2:
        f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(axis=1)
    n, d = f.shape
    if n < 4 or d < 2:
        raise ValueError(f"need at least 4 feature vectors of 2+ dimensions, got {f.shape}")
    mean = f.mean(axis=0)
    centred = f - mean
    k = gate_dims(n, d, cap)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:k].T
    cov, shrink = ledoit_wolf(centred @ components)
    residual = ((centred - centred @ components @ components.T) ** 2).sum(axis=1)
    scale = max(float(residual.mean()), 1e-12 * float((centred ** 2).sum() / n + 1e-30))
    info = {"n_fit": n, "feature_dim": d, "dims": k, "shrinkage": round(shrink, 4)}
    return Gate(mean, components, np.linalg.pinv(cov), scale, info=info)


def choose_threshold(scores: np.ndarray, max_false_refusal: float = 0.01) -> tuple[float, dict]:
    """A threshold refusing at most ``max_false_refusal`` of in-distribution images, from
    scores of images the gate was not fitted on; returns it and how it was chosen.

    The larger of two estimates: the split-conformal quantile (rank ceil((n+1)(1-a)), which
    guarantees the rate in expectation when it exists, i.e. n >= 1/a - 1), else the largest
    score; and the (1-a) quantile of a normal fitted to the log scores, which extrapolates past
    the largest score of a small set. Taking the larger is deliberately conservative.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < 3:
        raise ValueError(f"need at least 3 held-out scores to choose a threshold, got {n}")
    rank = math.ceil((n + 1) * (1 - max_false_refusal))
    conformal = float(s[min(rank, n) - 1])
    logs = np.log(np.maximum(s, 1e-12))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - max_false_refusal)
    parametric = float(math.exp(logs.mean() + z * logs.std(ddof=1)))
    how = {"n_threshold": n, "max_false_refusal": max_false_refusal,
           "conformal": round(conformal, 4), "conformal_exact": rank <= n,
           "lognormal": round(parametric, 4)}
    return max(conformal, parametric), how


def fit_gate(features_train: np.ndarray, features_val: np.ndarray,
             max_false_refusal: float = 0.01, cap: int = 32) -> Gate:
    """Fit on the training features, choose the threshold on the validation features."""
    gate = fit_features(features_train, cap)
    gate.threshold, how = choose_threshold(gate.score(features_val), max_false_refusal)
    gate.info.update(how, source="training")
    return gate


def cross_fit_gate(features: np.ndarray, max_false_refusal: float = 0.01, folds: int = 5,
                   cap: int = 32) -> Gate:
    """A gate from one small set (a site's reference): every image is scored by a gate fitted
    on the other folds, the threshold is chosen on those out-of-fold scores, and the final gate
    is fitted on all images (its in-set scores run lower, so the threshold errs on the side of
    accepting)."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    folds = max(2, min(folds, n // 4))
    order = np.random.default_rng(0).permutation(n)
    scores = np.empty(n)
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        scores[held] = fit_features(f[rest], cap).score(f[held])
    gate = fit_features(f, cap)
    gate.threshold, how = choose_threshold(scores, max_false_refusal)
    gate.info.update(how, folds=folds, source="reference")
    return gate
