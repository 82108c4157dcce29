"""Production against a candidate on the same images: pure statistics for `cxr models compare`
and the promotion guard.

Inputs are plain pairs (``db.prediction_roles.Pair``: each image's production and candidate
label and probability of the stage's positive class) and, where ground truth exists,
``truth``: image id -> label (NORMAL, BACTERIA, VIRUS or PNEUMONIA). Sensitivity and
specificity get Wilson score intervals (right at 0 and 1 and for small counts, where the normal
approximation is not), AUC a seeded percentile bootstrap, and the paired difference McNemar's
exact test on the discordant labelled images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from db.vocabulary import STAGE_CLASSES, Label, Stage
from trainer.training.evaluate import roc_auc

Z95 = 1.959963984540054
FLIPS_SHOWN = 50
AUC_BOOTSTRAP = 1000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (nan, nan) when ``n`` is 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` images only production got right, ``c`` only the
    candidate; 1.0 when they never disagree."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def auc_interval(y: np.ndarray, scores: np.ndarray, seed: int = 0,
                 n_boot: int = AUC_BOOTSTRAP) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the AUC (resampling images, seeded)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        value = roc_auc(y[idx], scores[idx])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return (float("nan"), float("nan"))
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def truth_positive(stage: str, label: str) -> bool | None:
    """Whether a ground-truth label is the stage's positive class; None when it says nothing
    about the stage (stage 2 cannot use NORMAL or an untyped PNEUMONIA)."""
    label = str(label).upper()
    if Stage(stage) == Stage.PNEUMONIA:
        return None if label not in Label.__members__ else label != Label.NORMAL
    return {Label.VIRUS.value: True, Label.BACTERIA.value: False}.get(label)


def compare(pairs: Sequence[Any], stage: str, truth: Mapping[int, str] | None = None
            ) -> dict[str, Any]:
    """Agreement, the 2x2 table (rows production, columns candidate), the images whose label
    would flip, and, on the images ``truth`` labels, both versions' sensitivity, specificity
    and AUC with 95 % intervals and McNemar's test."""
    negative, positive = STAGE_CLASSES[Stage(stage)]
    classes = [negative, positive]
    table = [[0, 0], [0, 0]]
    flips = []
    for pair in pairs:
        row, col = classes.index(pair.production_label), classes.index(pair.candidate_label)
        table[row][col] += 1
        if row != col:
            flips.append({"image_id": pair.image_id, "production": pair.production_label,
                          "candidate": pair.candidate_label,
                          "production_p": round(pair.production_p, 4),
                          "candidate_p": round(pair.candidate_p, 4)})
    n = len(pairs)
    agree = table[0][0] + table[1][1]
    return {
        "stage": str(Stage(stage)), "classes": classes, "n": n,
        "agreement": agree / n if n else float("nan"), "agreement_ci95": list(wilson(agree, n)),
        "table": table, "flips": len(flips), "flipped": flips[:FLIPS_SHOWN],
        "production_versions": sorted({p.production_version for p in pairs}),
        "labelled": labelled(pairs, stage, truth or {}),
    }


def labelled(pairs: Sequence[Any], stage: str, truth: Mapping[int, str]) -> dict[str, Any] | None:
    """Both versions against the ground truth, or None when no compared image has a label."""
    known = [(p, truth_positive(stage, truth[p.image_id])) for p in pairs if p.image_id in truth]
    known = [(p, y) for p, y in known if y is not None]
    if not known:
        return None
    positive = STAGE_CLASSES[Stage(stage)][1]
    y = np.array([int(t) for _, t in known])
    out: dict[str, Any] = {"n": len(known), "n_positive": int(y.sum())}
    right = {}
    for who in ("production", "candidate"):
        said = np.array([getattr(p, f"{who}_label") == positive for p, _ in known], dtype=int)
        scores = np.array([getattr(p, f"{who}_p") for p, _ in known])
        right[who] = said == y
        tp, tn = int(((said == 1) & (y == 1)).sum()), int(((said == 0) & (y == 0)).sum())
        pos, neg = int(y.sum()), int((1 - y).sum())
        out[who] = {
            "sensitivity": _proportion(tp, pos), "specificity": _proportion(tn, neg),
            "auc": {"value": roc_auc(y, scores), "ci95": list(auc_interval(y, scores))},
        }
    b = int((right["production"] & ~right["candidate"]).sum())
    c = int((~right["production"] & right["candidate"]).sum())
    out["mcnemar"] = {"production_only_right": b, "candidate_only_right": c,
                      "p_value": mcnemar(b, c)}
    return out


def _proportion(k: int, n: int) -> dict[str, Any]:
    return {"value": k / n if n else float("nan"), "k": k, "n": n, "ci95": list(wilson(k, n))}


def guard(report: Mapping[str, Any] | None) -> str | None:
    """Why promoting the candidate is refused, or None: on labelled images, the candidate's
    lower 95 % bound on stage-1 sensitivity below production's point estimate."""
    if not report or report.get("stage") != Stage.PNEUMONIA.value:
        return None
    labels = report.get("labelled")
    if not labels:
        return None
    cand, prod = labels["candidate"]["sensitivity"], labels["production"]["sensitivity"]
    if math.isnan(cand["ci95"][0]) or math.isnan(prod["value"]):
        return None
    if cand["ci95"][0] < prod["value"]:
        return (f"on {labels['n']} labelled images the candidate's sensitivity is "
                f"{cand['value']:.3f} (95 % CI {cand['ci95'][0]:.3f}-{cand['ci95'][1]:.3f}), "
                f"its lower bound below production's {prod['value']:.3f}")
    return None
