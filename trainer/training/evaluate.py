"""Binary and cascade metrics in plain numpy (no scikit-learn here), so they are tested directly.

Accuracy alone hides the failure that matters in triage (a missed pneumonia), so every
evaluation reports sensitivity, specificity, precision, F1 and ROC AUC with bootstrap intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from db.vocabulary import CASCADE_CLASSES
from trainer.model.cascade import cascade_labels

BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def _arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} != {s.size}")
    return y, s


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def confusion(y_true, y_pred) -> np.ndarray:
    """2x2 matrix ``[[tn, fp], [fn, tp]]``: rows are the truth, columns the prediction."""
    y, p = np.asarray(y_true).astype(int).ravel(), np.asarray(y_pred).astype(int).ravel()
    m = np.zeros((2, 2), dtype=int)
    np.add.at(m, (y, p), 1)
    return m


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0,0) to (1,1); positive means ``score >= threshold``."""
    y, s = _arrays(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); NaN with one class only."""
    y, s = _arrays(y_true, scores)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_metrics(y_true, scores, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision and F1 at ``score >= threshold``."""
    y, s = _arrays(y_true, scores)
    (tn, fp), (fn, tp) = confusion(y, s >= threshold)
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_for_sensitivity(y_true, scores, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (best specificity that keeps it).

    Tuned on validation data, never on test. With no positives it returns 0.5.
    """
    y, s = _arrays(y_true, scores)
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        return 0.5
    needed = int(np.ceil(target * pos.size - 1e-9))
    needed = min(max(needed, 1), pos.size)
    return float(pos[needed - 1])


def bootstrap_ci(
    y_true, scores, threshold: float, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling images, seeded) for every reported metric."""
    y, s = _arrays(y_true, scores)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in BOOTSTRAP_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        yb, sb = y[idx], s[idx]
        values = threshold_metrics(yb, sb, threshold)
        values["auc"] = roc_auc(yb, sb)
        for k in BOOTSTRAP_METRICS:
            samples[k].append(values[k])
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, vals in samples.items():
        arr = np.asarray(vals)
        arr = arr[~np.isnan(arr)]
        out[k] = (
            (float(np.percentile(arr, lo_q)), float(np.percentile(arr, hi_q)))
            if arr.size
            else (float("nan"), float("nan"))
        )
    return out


def evaluate_binary(
    y_true, scores, threshold: float, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Everything the report shows for one stage: point metrics, AUC, CIs, confusion matrix."""
    y, s = _arrays(y_true, scores)
    metrics: dict[str, Any] = threshold_metrics(y, s, threshold)
    metrics["auc"] = roc_auc(y, s)
    metrics["threshold"] = float(threshold)
    metrics["n"] = int(y.size)
    metrics["n_positive"] = int(y.sum())
    metrics["confusion"] = confusion(y, s >= threshold).tolist()
    cis = bootstrap_ci(y, s, threshold, n_boot=n_boot, seed=seed)
    metrics["ci95"] = {k: list(v) for k, v in cis.items()}
    return metrics


def evaluate_cascade(
    labels3, p_pneumonia, p_virus, pneumonia_threshold: float, infection_threshold: float
) -> dict[str, Any]:
    """End-to-end three-class result of both stages on the same images, decided by the rule
    the workers serve (``trainer.model.cascade``).

    ``labels3`` are names from ``CASCADE_CLASSES`` or their indices.
    """
    truth = np.asarray(
        [CASCADE_CLASSES.index(v) if isinstance(v, str) else int(v) for v in labels3], dtype=int
    )
    labels = cascade_labels(p_pneumonia, p_virus, pneumonia_threshold, infection_threshold)
    pred = np.asarray([CASCADE_CLASSES.index(label) for label in labels], dtype=int)
    m = np.zeros((3, 3), dtype=int)
    np.add.at(m, (truth, pred), 1)
    recall = {c: _ratio(m[i, i], m[i].sum()) for i, c in enumerate(CASCADE_CLASSES)}
    precision = {c: _ratio(m[i, i], m[:, i].sum()) for i, c in enumerate(CASCADE_CLASSES)}
    return {
        "classes": list(CASCADE_CLASSES),
        "accuracy": _ratio(np.trace(m), m.sum()),
        "recall": recall,
        "precision": precision,
        "confusion": m.tolist(),
        "n": int(m.sum()),
    }
