"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.model.cascade import cascade_labels
from trainer.training import evaluate

Y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
S = [0.1, 0.4, 0.35, 0.8, 0.9, 0.7, 0.65, 0.3, 0.85, 0.95]


def test_confusion_and_threshold_metrics_by_hand():
    # at 0.5: negatives 0.1 0.4 0.35 -> tn=3, 0.8 -> fp=1; positives 0.3 -> fn=1, rest tp=5
    assert evaluate.confusion(Y, np.asarray(S) >= 0.5).tolist() == [[3, 1], [1, 5]]
    m = evaluate.threshold_metrics(Y, S, 0.5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))


def test_roc_auc_by_hand_and_ties():
    # pairs (pos > neg): 0.9,0.85,0.95 beat all 4 -> 12; 0.7,0.65 beat 3 -> 6; 0.3 beats 1 -> 1
    assert evaluate.roc_auc(Y, S) == pytest.approx(19 / 24)
    assert evaluate.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert evaluate.roc_auc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)
    assert evaluate.roc_auc([1, 0], [0.9, 0.1]) == 1.0
    assert math.isnan(evaluate.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_curve_area_matches_auc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.5 + y * 0.3, 2)  # rounding makes ties
    fpr, tpr, thr = evaluate.roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(thr) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(evaluate.roc_auc(y, s))


def test_threshold_for_sensitivity_keeps_target_with_best_specificity():
    # positive scores sorted: .95 .9 .85 .7 .65 .3; 4/6 >= 0.66 needs threshold 0.7
    assert evaluate.threshold_for_sensitivity(Y, S, 0.66) == pytest.approx(0.7)
    t = evaluate.threshold_for_sensitivity(Y, S, 0.95)
    assert t == pytest.approx(0.3)
    assert evaluate.threshold_metrics(Y, S, t)["sensitivity"] == 1.0
    assert evaluate.threshold_for_sensitivity([0, 0], [0.1, 0.2]) == 0.5


def test_bootstrap_ci_is_seeded_and_brackets_the_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    a = evaluate.bootstrap_ci(y, s, 0.5, n_boot=200, seed=7)
    b = evaluate.bootstrap_ci(y, s, 0.5, n_boot=200, seed=7)
    assert a == b
    point = evaluate.threshold_metrics(y, s, 0.5) | {"auc": evaluate.roc_auc(y, s)}
    for key, (lo, hi) in a.items():
        assert lo <= point[key] <= hi, key
        assert hi - lo < 0.25, key


def test_evaluate_binary_bundles_everything():
    m = evaluate.evaluate_binary(Y, S, 0.5, n_boot=50, seed=1)
    assert m["confusion"] == [[3, 1], [1, 5]]
    assert m["n"] == 10 and m["n_positive"] == 6 and m["threshold"] == 0.5
    assert set(m["ci95"]) == set(evaluate.BOOTSTRAP_METRICS)


def test_cascade_three_class():
    labels = ["NORMAL", "NORMAL", "BACTERIA", "BACTERIA", "VIRUS", "VIRUS"]
    p1 = [0.1, 0.8, 0.9, 0.2, 0.9, 0.7]
    p2 = [0.9, 0.1, 0.3, 0.9, 0.8, 0.2]
    assert cascade_labels(p1, p2, 0.5, 0.5) == [
        "NORMAL", "BACTERIA", "BACTERIA", "NORMAL", "VIRUS", "BACTERIA"
    ]
    assert cascade_labels(p1, None, 0.5, None)[:2] == ["NORMAL", "PNEUMONIA"]
    out = evaluate.evaluate_cascade(labels, p1, p2, 0.5, 0.5)
    assert out["confusion"] == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["recall"] == {"NORMAL": 0.5, "BACTERIA": 0.5, "VIRUS": 0.5}
    assert out["precision"]["BACTERIA"] == pytest.approx(1 / 3)
