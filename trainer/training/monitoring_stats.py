"""The statistics of monitoring a served model, in plain numpy: intervals for rates, AUC with a
DeLong interval, and two drift measures (population stability index and Kolmogorov-Smirnov).

Pure functions of arrays, so they are tested against hand-computed values; ``evaluate`` has the
point metrics (the same definitions the training report uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer.training.evaluate import roc_auc

Z95 = 1.959963984540054
"""The two-sided 95 % normal quantile."""

PROBABILITY_EDGES = tuple(round(i / 10, 1) for i in range(11))
"""The bins of a probability histogram (reference and served alike): ten of width 0.1."""


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a rate (good at small n and near 0 or 1); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int) -> tuple[float | None, tuple[float, float] | None]:
    """(point, Wilson 95 % interval), both None when there is nothing to count."""
    return (successes / n if n else None), wilson(successes, n)


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def delong_auc(y_true, scores, z: float = Z95
               ) -> tuple[float | None, tuple[float, float] | None]:
    """ROC AUC and its DeLong 95 % interval (DeLong et al. 1988, Sun and Xu's fast midranks);
    (None, None) with one class only, the interval None with a single image of a class."""
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        return None, None
    auc = roc_auc(y, s)
    if m < 2 or n < 2:
        return auc, None
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.r_[pos, neg])
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    var = np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n
    half = z * math.sqrt(max(var, 0.0))
    return auc, (max(0.0, auc - half), min(1.0, auc + half))


def histogram(values, edges: Sequence[float] = PROBABILITY_EDGES) -> list[int]:
    """Counts of ``values`` in the bins of ``edges`` (the last bin includes its right edge)."""
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), edges[0], edges[-1])
    return np.histogram(v, bins=np.asarray(edges, dtype=np.float64))[0].astype(int).tolist()


def _shares(counts) -> np.ndarray:
    """Bin shares with half a count added to each bin, so an empty bin has a finite log."""
    c = np.asarray(counts, dtype=np.float64) + 0.5
    return c / c.sum()


def psi(reference_counts, actual_counts) -> float | None:
    """Population stability index of ``actual`` against ``reference`` over the same bins:
    sum (a - r) ln(a / r). Under 0.1 stable, 0.1-0.2 moved, over 0.2 shifted (the usual
    reading). None when either side is empty."""
    if sum(reference_counts) == 0 or sum(actual_counts) == 0:
        return None
    r, a = _shares(reference_counts), _shares(actual_counts)
    return float(np.sum((a - r) * np.log(a / r)))


def ks_binned(reference_counts, actual_counts) -> float | None:
    """Kolmogorov-Smirnov statistic between two distributions binned alike: the largest gap
    between their cumulative shares at the bin edges (the reference is stored as a histogram).
    None when either side is empty."""
    ref, act = np.asarray(reference_counts, float), np.asarray(actual_counts, float)
    if ref.sum() == 0 or act.sum() == 0:
        return None
    return float(np.max(np.abs(np.cumsum(ref) / ref.sum() - np.cumsum(act) / act.sum())))


def category_counts(values: Sequence[str], categories: Sequence[str]) -> list[int]:
    """Counts of each of ``categories`` among ``values`` (same order: PSI over categories)."""
    return [sum(1 for v in values if v == c) for c in categories]


def _ci(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 6), round(interval[1], 6)]


def _with_ci(name: str, successes: int, n: int) -> dict[str, object]:
    point, interval = rate(successes, n)
    return {name: point, f"{name}_ci": _ci(interval)}


def binary_summary(truth: Sequence[bool], predicted: Sequence[bool], scores: Sequence[float],
                   prefix: str = "") -> dict[str, object]:
    """n_labelled, sensitivity, specificity, accuracy (Wilson intervals) and AUC (DeLong) of
    one stage's answers; keys get ``prefix`` (e.g. ``infection_``)."""
    y, p = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp, tn = int(np.sum(y & p)), int(np.sum(~y & ~p))
    out: dict[str, object] = {"n_labelled": int(y.size)}
    out |= _with_ci("sensitivity", tp, int(y.sum()))
    out |= _with_ci("specificity", tn, int((~y).sum()))
    out |= _with_ci("accuracy", tp + tn, int(y.size))
    auc, interval = delong_auc(y.astype(int), scores) if y.size else (None, None)
    out |= {"auc": auc, "auc_ci": _ci(interval)}
    return {f"{prefix}{k}": v for k, v in out.items()}


def accuracy_summary(correct: Sequence[bool], name: str) -> dict[str, object]:
    """``n_<name>``, ``<name>`` and ``<name>_ci`` (Wilson) of a list of right/wrong answers."""
    return {f"n_{name}": len(correct), **_with_ci(name, int(sum(correct)), len(correct))}
