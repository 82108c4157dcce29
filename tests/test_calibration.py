"""Temperature scaling, ECE/Brier, the uncertain band (trainer.model.calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.model.calibration import (
    Calibration,
    band_error,
    brier,
    calibrate,
    choose_band,
    ece,
    fit_calibration,
    fit_temperature,
    in_band,
)


def overconfident(n: int, seed: int, sharpen: float = 3.0):
    """Labels drawn from true probabilities sigmoid(z); the "model" says sigmoid(sharpen*z)."""
    rng = np.random.default_rng(seed)
    y_latent = rng.random(n) < 0.5
    z = rng.normal(np.where(y_latent, 3.0, -3.0), 1.5)
    truth = 1 / (1 + np.exp(-z))
    y = (rng.random(n) < truth).astype(int)
    return 1 / (1 + np.exp(-sharpen * z)), y


def test_temperature_recovers_the_overconfidence_and_lowers_ece_on_held_out_data():
    p_val, y_val = overconfident(2000, 1)
    p_test, y_test = overconfident(20000, 2)
    t = fit_temperature(p_val, y_val)
    assert t == pytest.approx(3.0, rel=0.15)
    before, after = ece(p_test, y_test), ece(calibrate(p_test, t), y_test)
    assert after < before / 3
    assert brier(calibrate(p_test, t), y_test) < brier(p_test, y_test)


def test_temperature_keeps_every_label_and_is_neutral_without_both_classes():
    p, y = overconfident(500, 3)
    t = fit_temperature(p, y)
    q = calibrate(p, t)
    order = np.argsort(p)
    assert (np.diff(q[order]) >= 0).all()  # monotone: the ranking (and the AUC) is unchanged
    assert np.array_equal(p >= 0.5, q >= calibrate(0.5, t))
    assert fit_temperature(p, np.ones_like(y)) == 1.0


def test_band_outside_error_meets_the_target_on_held_out_data():
    target = 0.05
    p_val, y_val = overconfident(3000, 4)
    p_test, y_test = overconfident(20000, 5)
    cal = fit_calibration(p_val, y_val, threshold=0.5, max_error=target)
    lo, hi = cal.band
    assert lo <= cal.threshold <= hi
    assert cal.error_outside <= target
    error, coverage = band_error(calibrate(p_test, cal.temperature), y_test, cal.threshold,
                                 cal.band)
    # the band keeps 1.645 standard errors of margin on validation; allow two binomial standard
    # errors of the held-out estimate itself (n outside ~ coverage * 20000)
    slack = 2 * math.sqrt(target * (1 - target) / (coverage * len(y_test)))
    assert error <= target + slack
    assert abs(coverage - cal.coverage) < 0.05
    assert 0.2 < coverage < 0.95  # an informative band: neither everything nor nothing


def test_band_is_the_narrowest_that_meets_the_target():
    p = np.array([0.05, 0.2, 0.4, 0.45, 0.55, 0.6, 0.8, 0.95])
    y = np.array([0, 0, 1, 0, 0, 1, 1, 1])  # wrong: 0.4 (says 0) and 0.55 (says 1)
    lo, hi = choose_band(p, y, 0.5, max_error=0.0, z=0.0)
    assert (lo, hi) == (0.4, 0.6)
    assert not in_band(p, (lo, hi))[[0, 1, 5, 6, 7]].any()
    assert in_band(p, (lo, hi))[[2, 3, 4]].all()
    assert choose_band(p, y, 0.5, max_error=0.5, z=0.0) == (0.5, 0.5)


def test_calibration_round_trips_through_the_manifest(tmp_path):
    from helpers_models import tiny_manifest

    from trainer.model.bundle import Manifest

    p, y = overconfident(400, 6)
    cal = fit_calibration(p, y, 0.5)
    manifest = tiny_manifest("pneumonia", 1, calibration=cal.to_dict())
    manifest.write(tmp_path / "m.json")
    again = Calibration.from_dict(Manifest.read(tmp_path / "m.json").calibration)
    assert again.temperature == cal.temperature and again.band == cal.band
    assert again.metrics["ece_after"] < again.metrics["ece_before"]


def test_old_manifest_without_gate_or_calibration_loads_unchanged(tmp_path):
    from helpers_models import tiny_manifest

    from trainer.model.bundle import Manifest

    old = tiny_manifest("pneumonia", 1).to_dict()
    del old["gate"], old["calibration"]
    loaded = Manifest.from_dict(old)
    assert loaded.gate == {} and loaded.calibration == {}
    assert {k: v for k, v in loaded.to_dict().items() if k in old} == old


def test_reliability_plot_is_written(tmp_path):
    from trainer.training.calibration_plots import plot_reliability

    p, y = overconfident(500, 7)
    cal = fit_calibration(p, y, 0.5)
    out = plot_reliability(cal.reliability, tmp_path / "rel.png", band=cal.band, synthetic=True)
    assert out.read_bytes().startswith(b"\x89PNG")
