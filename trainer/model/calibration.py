"""Calibrated probabilities and the "uncertain" band, per stage, fitted on validation.

* Temperature scaling (Guo et al. 2017): the served probability is sigmoid(logit(p) / T) with
  one T per stage, fitted by minimising the validation log loss. One parameter cannot overfit a
  few hundred validation images and cannot reorder them (AUC and the ranking are unchanged),
  which isotonic regression or Platt's two parameters do not promise on small sets.
* ECE over 15 equal-width bins of the predicted probability of the positive class (the
  reliability diagram's reading: in each bin, how often the positive class really occurs against
  how often it was predicted), and the Brier score.
* The band: the narrowest [lo, hi] around the threshold such that, on validation, the images
  outside it (p < lo or p >= hi) are misclassified at most ``max_error`` of the time, with a
  margin of 1.645 standard errors so that the target holds on new images, not only there. Inside it
  the label stands but is flagged for review; ``coverage`` is the share outside it.

Serving needs only ``calibrate`` and ``in_band`` (numpy), with the numbers from the manifest's
``calibration`` entry (``Calibration.to_dict``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ECE_BINS = 15
_EPS = 1e-7
BAND_Z = 1.645
"""The band's validation error outside must sit this many binomial standard errors below
``max_error`` (one-sided 95 %): the bare empirical rule meets the target on validation only,
and a new set's error scatters around it, half of the time above."""
LOG_T_RANGE = (-4.0, 4.0)
"""Temperatures searched: e^-4 (sharpen 55x) to e^4 (soften 55x)."""


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(q) - np.log1p(-q)


def calibrate(p: np.ndarray | float, temperature: float) -> np.ndarray:
    """Calibrated probabilities: sigmoid(logit(p) / temperature)."""
    z = logit(p) / float(temperature)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())


def _golden(f, lo: float, hi: float, tol: float = 1e-5) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi] by golden-section search."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The T minimising validation log loss of sigmoid(logit(p) / T); 1.0 without both
    classes. The loss is convex in 1/T, hence unimodal in log T: golden-section search."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        return 1.0
    z = logit(p)

    def loss(log_t: float) -> float:
        return log_loss(1.0 / (1.0 + np.exp(-z / math.exp(log_t))), y)

    return float(math.exp(_golden(loss, *LOG_T_RANGE)))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin: mean predicted probability, observed positive rate, count."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(idx, weights=p, minlength=bins) / count
        observed = np.bincount(idx, weights=y, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1).tolist(),
            "predicted": np.nan_to_num(predicted).tolist(),
            "observed": np.nan_to_num(observed).tolist(), "count": count.tolist()}


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: count-weighted mean |observed - predicted| over bins."""
    r = reliability(p, y, bins)
    count = np.asarray(r["count"], dtype=np.float64)
    if count.sum() == 0:
        return 0.0
    gap = np.abs(np.asarray(r["observed"]) - np.asarray(r["predicted"]))
    return float((gap * count).sum() / count.sum())


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2).mean())


def band_error(p: np.ndarray, y: np.ndarray, threshold: float,
               band: tuple[float, float]) -> tuple[float, float]:
    """(error rate outside ``band``, coverage = share outside it) for labels by threshold."""
    p, y = np.asarray(p), np.asarray(y).astype(bool)
    outside = ~in_band(p, band)
    wrong = (p >= threshold) != y
    n_out = int(outside.sum())
    error = float(wrong[outside].sum() / n_out) if n_out else 0.0
    return error, n_out / max(1, len(p))


def in_band(p: np.ndarray | float, band: tuple[float, float] | list[float]) -> np.ndarray:
    """True where a (calibrated) probability lies in the uncertain band: lo <= p < hi."""
    lo, hi = float(band[0]), float(band[1])
    q = np.asarray(p)
    return (q >= lo) & (q < hi)


def choose_band(p: np.ndarray, y: np.ndarray, threshold: float, max_error: float = 0.05,
                z: float = BAND_Z) -> tuple[float, float]:
    """The narrowest [lo, hi] with lo <= threshold <= hi whose outside error on (p, y) is at
    most ``max_error`` with ``z`` binomial standard errors to spare; ties go to the larger
    coverage. Candidate edges are the threshold and the observed probabilities, so the search
    is exact: cumulative error counts below lo and from hi up, all pairs at once."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    wrong = (p >= threshold) != y
    lows = np.unique(np.append(p[p <= threshold], threshold))
    highs = np.unique(np.append(p[p >= threshold], threshold))
    highs = np.append(highs, np.nextafter(1.0, 2.0))  # hi above every p: nothing outside above
    order = np.argsort(p)
    ps, ws = p[order], wrong[order]
    cw = np.concatenate([[0], np.cumsum(ws)])
    below = np.searchsorted(ps, lows, side="left")  # count with p < lo
    above_start = np.searchsorted(ps, highs, side="left")  # first index with p >= hi
    n_out = below[:, None] + (len(ps) - above_start)[None, :]
    err = cw[below][:, None] + (cw[-1] - cw[above_start])[None, :]
    ok = err <= max_error * n_out - z * np.sqrt(max_error * (1 - max_error) * n_out)
    width = np.where(ok, highs[None, :] - lows[:, None], np.inf)
    best = np.flatnonzero(width == width.min())
    pick = best[np.argmax(n_out.ravel()[best])]
    i, j = np.unravel_index(pick, width.shape)
    return float(lows[i]), float(min(highs[j], 1.0))


@dataclass
class Calibration:
    """One stage's calibration as stored in the manifest (``calibration``) and the model card."""

    temperature: float
    threshold: float
    band: list[float]
    max_error: float
    coverage: float
    error_outside: float
    metrics: dict[str, float] = field(default_factory=dict)
    reliability: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """For the manifest: everything but the reliability bins (those go to the card)."""
        d = asdict(self)
        d.pop("reliability")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(float(data["temperature"]), float(data["threshold"]),
                   [float(b) for b in data["band"]],
                   float(data["max_error"]), float(data["coverage"]),
                   float(data["error_outside"]), dict(data.get("metrics", {})))


def fit_calibration(p_val: np.ndarray, y_val: np.ndarray, threshold: float,
                    max_error: float = 0.05) -> Calibration:
    """Temperature, then the band on the calibrated validation probabilities, with ECE and
    Brier before and after. ``threshold`` is the raw one; the stored ``threshold`` is it
    calibrated, so every image keeps its label (calibration is monotone) and the manifest's
    threshold compares with served, calibrated probabilities."""
    p_val, y_val = np.asarray(p_val), np.asarray(y_val)
    t = fit_temperature(p_val, y_val)
    q = calibrate(p_val, t)
    cut = float(calibrate(threshold, t))
    band = choose_band(q, y_val, cut, max_error)
    error, coverage = band_error(q, y_val, cut, band)
    metrics = {"ece_before": ece(p_val, y_val), "ece_after": ece(q, y_val),
               "brier_before": brier(p_val, y_val), "brier_after": brier(q, y_val),
               "n_val": int(len(y_val))}
    return Calibration(t, cut, list(band), max_error, coverage, error,
                       {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
                       {"before": reliability(p_val, y_val), "after": reliability(q, y_val)})
