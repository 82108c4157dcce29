"""The learned out-of-distribution score behind the input gate (``trainer.model.gate``).

In the span of the top principal components of in-distribution vectors (a model's penultimate
features, or an image's coarse layout), a Mahalanobis distance under a Ledoit-Wolf shrunk
covariance; outside it, the residual energy. Each term is scaled to mean 1 on held-out
in-distribution vectors and the two are added. Mahalanobis on a classifier's features is what
separates non-chest from chest radiographs in the literature (FRODO, arXiv 1907.01253), where
the classifier's own confidence does no better than chance; the PCA keeps the covariance
estimable from a small set (k = min(32, n/3) dimensions), the shrinkage keeps its smallest
eigenvalues from collapsing, and the residual term catches inputs that leave the span
entirely, which an in-span distance alone cannot see. Thresholds come from scores of images
the gate was not fitted on: a validation set (``fit_gate``) or leave-one-out on a small
reference (``cross_fit_gate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.model.refusal import Refusal


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

    ``score`` = (Mahalanobis^2 in the top-k PCA span) / k / ``maha_scale`` + (residual energy)
    / ``residual_scale``, both scales being the terms' means on held-out in-distribution images
    (``rescale``): about 2 for a typical chest film. ``threshold`` is on that score.
    """

    mean: np.ndarray
    components: np.ndarray
    precision: np.ndarray
    residual_scale: float
    threshold: float = float("inf")
    maha_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    def parts(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in-span Mahalanobis^2 / k, residual energy), each before its scale."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim > 2:
            f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(axis=1)
        centred = f - self.mean
        z = centred @ self.components
        maha = np.einsum("ij,jk,ik->i", z, self.precision, z) / self.dims
        return maha, ((centred - z @ self.components.T) ** 2).sum(axis=1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Score for each row of (N, D) features (a 4-D feature map is averaged over space)."""
        maha, residual = self.parts(features)
        return (maha / self.maha_scale + residual / self.residual_scale).astype(np.float32)

    def rescale(self, features: np.ndarray) -> None:
        """Scale both terms to mean 1 on held-out in-distribution ``features``: on the fitting
        set the residual is underestimated (the span was fitted to it), by more the smaller
        the set, and would otherwise swamp the Mahalanobis term on new images."""
        maha, residual = self.parts(features)
        self.maha_scale = max(float(maha.mean()), 1e-12)
        self.residual_scale = max(float(residual.mean()), 1e-12)

    def refusal(self, score: float) -> Refusal | None:
        """The refusal for one image's score, or None when it passes."""
        if not score > self.threshold:
            return None
        what = _WHAT.get(self.info.get("input", "features"), _WHAT["features"])
        return Refusal("out_of_scope", f"does not look like a frontal chest X-ray: {what}"
                       f" (score {score:.2f}, threshold {self.threshold:.2f}); check the body"
                       " part, the view and the export", float(score), float(self.threshold))


_WHAT = {"features": "the model finds its features unfamiliar",
         "layout": "its layout of dark and bright regions is unlike a frontal chest film"}

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


CONFIDENCE = 0.9
"""How sure the threshold must be that the false refusal rate stays under its target."""


def _rank_risk(n: int, rank: int, rate: float) -> float:
    """P(a new in-distribution score exceeds the rank-th smallest of n is more than ``rate``)
    = P(Binomial(n, 1 - rate) >= rank) (order statistics of uniforms; Vovk 2012)."""
    q = 1 - rate
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                 + k * math.log(q) + (n - k) * math.log(rate) for k in range(rank, n + 1)]
    top = max(log_terms)
    return math.exp(top) * sum(math.exp(t - top) for t in log_terms)


def choose_threshold(scores: np.ndarray, max_false_refusal: float = 0.01) -> tuple[float, dict]:
    """A threshold refusing at most ``max_false_refusal`` of in-distribution images with
    probability ``CONFIDENCE``, from scores of images the gate was not fitted on; returns it
    and how it was chosen.

    The smallest order statistic that holds the rate with that confidence (a training-
    conditional conformal bound: the plain quantile meets the rate only on average, and a
    threshold chosen once is then wrong for every image half of the time). Fewer scores than
    that needs (about 460 for 0.5 %, 230 for 1 %) certify nothing: then the larger of the
    largest score and the (1-a) quantile of a normal fitted to the log scores, and
    ``certified`` is False; the largest of n scores refuses about 1/(n+1) of new images.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < 3:
        raise ValueError(f"need at least 3 held-out scores to choose a threshold, got {n}")
    from statistics import NormalDist

    rate = max_false_refusal
    rank = next((r for r in range(math.ceil((n + 1) * (1 - rate)), n + 1)
                 if _rank_risk(n, r, rate) <= 1 - CONFIDENCE), None)
    logs = np.log(np.maximum(s, 1e-12))
    parametric = float(math.exp(logs.mean() + NormalDist().inv_cdf(1 - rate) * logs.std(ddof=1)))
    how: dict[str, Any] = {"n_threshold": n, "max_false_refusal": rate,
                           "certified": rank is not None, "lognormal": round(parametric, 4)}
    if rank is not None:
        how["rank"] = rank
        return float(s[rank - 1]), how
    how["largest"] = round(float(s[-1]), 4)
    return max(float(s[-1]), parametric), how


def fit_gate(features_train: np.ndarray, features_val: np.ndarray,
             max_false_refusal: float = 0.01, cap: int = 32) -> Gate:
    """Fit on the training features, choose the threshold on the validation features."""
    gate = fit_features(features_train, cap)
    gate.rescale(features_val)
    gate.threshold, how = choose_threshold(gate.score(features_val), max_false_refusal)
    gate.info.update(how, source="training")
    return gate


def cross_fit_gate(features: np.ndarray, max_false_refusal: float = 0.01, folds: int = 0,
                   cap: int = 32) -> Gate:
    """A gate from one small set (a site's reference): every image is scored by a gate fitted
    on the others, the threshold is chosen on those held-out scores, and the final gate is
    fitted on all images. ``folds`` 0 means leave-one-out up to 200 images (each held-out gate
    is then as close as can be to the final one: same dimension, one image fewer), else 10.
    """
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    k = gate_dims(n, f.shape[-1], cap)
    folds = folds or (n if n <= 200 else 10)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(0).permutation(n)
    maha, residual = np.empty(n), np.empty(n)
    for i in range(folds):
        held = order[i::folds]
        rest = np.setdiff1d(order, held)
        maha[held], residual[held] = fit_features(f[rest], k).parts(f[held])
    gate = fit_features(f, k)
    gate.maha_scale, gate.residual_scale = float(maha.mean()), float(residual.mean())
    scores = maha / gate.maha_scale + residual / gate.residual_scale
    gate.threshold, how = choose_threshold(scores, max_false_refusal)
    gate.info.update(how, folds=folds, source="reference")
    return gate
