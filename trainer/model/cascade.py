"""The cascade's decision rule, the one place serving and evaluation both take it from.

Stage 1 says NORMAL or PNEUMONIA; only pneumonia goes to stage 2, which says BACTERIA or VIRUS.
Every threshold here is on the probability of the stage's positive class (PNEUMONIA, VIRUS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from db.vocabulary import Label


def positive_probability(proba, class_names: Sequence[str], positive: str) -> np.ndarray:
    """p(positive) from a model's p(class_names[1]), whatever the model's class order."""
    names = [name.upper() for name in class_names]
    proba = np.asarray(proba, dtype=np.float64)
    if names[1] == positive:
        return proba
    if names[0] == positive:
        return 1.0 - proba
    raise ValueError(f"model classes {list(class_names)} do not include {positive}")


def positive_threshold(threshold: float, class_names: Sequence[str], positive: str) -> float:
    """A manifest's threshold (on p(class_names[1]), inclusive) as a threshold on p(positive).

    With the positive class first, "p(second) < t" is "p(positive) > 1 - t": the next float up.
    """
    if class_names[1].upper() == positive:
        return float(threshold)
    return float(np.nextafter(1.0 - float(threshold), 2.0))


def cascade_labels(
    p_pneumonia, p_virus, pneumonia_threshold: float, infection_threshold: float | None
) -> list[Label]:
    """NORMAL below the stage-1 threshold; otherwise VIRUS at or above the stage-2 threshold and
    BACTERIA below it, or PNEUMONIA where stage 2 did not run (``p_virus`` None or NaN)."""
    p1 = np.asarray(p_pneumonia, dtype=np.float64).reshape(-1)
    p2 = np.full(p1.shape, np.nan) if p_virus is None else np.asarray(
        [np.nan if v is None else v for v in np.asarray(p_virus, dtype=object).reshape(-1)],
        dtype=np.float64,
    )
    labels = []
    for first, second in zip(p1, p2, strict=True):
        if first < pneumonia_threshold:
            labels.append(Label.NORMAL)
        elif np.isnan(second) or infection_threshold is None:
            labels.append(Label.PNEUMONIA)
        else:
            labels.append(Label.VIRUS if second >= infection_threshold else Label.BACTERIA)
    return labels
