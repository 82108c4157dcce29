"""The monitoring statistics against hand-computed values and slow, direct definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.training.monitoring_stats import (
    binary_summary,
    delong_auc,
    histogram,
    ks_binned,
    psi,
    wilson,
)


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) is None


def _delong_by_definition(pos, neg):
    """AUC and its DeLong variance from the O(m n) structural components."""
    def kernel(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [np.mean([kernel(x, y) for y in neg]) for x in pos]
    v01 = [np.mean([kernel(x, y) for x in pos]) for y in neg]
    auc = float(np.mean(v10))
    return auc, np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)


def test_delong_interval_equals_the_definition_with_ties():
    rng = np.random.default_rng(3)
    pos = np.round(rng.uniform(0.3, 1.0, 17), 1)
    neg = np.round(rng.uniform(0.0, 0.7, 23), 1)
    auc, var = _delong_by_definition(pos, neg)
    got, (low, high) = delong_auc([1] * 17 + [0] * 23, np.r_[pos, neg])
    assert got == pytest.approx(auc)
    half = 1.959963984540054 * math.sqrt(var)
    assert (low, high) == pytest.approx((max(0, auc - half), min(1, auc + half)))
    assert delong_auc([1, 1], [0.2, 0.3]) == (None, None)


def test_psi_and_ks_of_binned_distributions():
    ref = [50, 50]
    assert psi(ref, [50, 50]) == pytest.approx(0.0)
    a, r = np.array([90.5, 10.5]) / 101, np.array([50.5, 50.5]) / 101
    assert psi(ref, [90, 10]) == pytest.approx(float(np.sum((a - r) * np.log(a / r))))
    assert ks_binned([10, 0, 0], [0, 0, 10]) == pytest.approx(1.0)
    assert ks_binned([5, 5], [5, 5]) == 0.0
    assert psi([0, 0], [1, 2]) is None
    assert histogram([0.0, 0.05, 0.95, 1.0, 0.5]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]


def test_binary_summary_counts_and_intervals():
    truth = [True, True, True, False, False]
    predicted = [True, True, False, False, True]
    out = binary_summary(truth, predicted, [0.9, 0.8, 0.3, 0.2, 0.7])
    assert out["n_labelled"] == 5
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(1 / 2)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["sensitivity_ci"] == pytest.approx(list(wilson(2, 3)), abs=1e-6)
    assert out["auc"] == pytest.approx(5 / 6)
