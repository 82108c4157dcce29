"""Knowing when not to answer, fitted at training time: each stage's calibration and band, and
stage 1's input gate, from the run's own training and validation images.

* Calibration (``trainer.model.calibration``): temperature and the uncertain band on the
  validation probabilities, for at most ``max_error`` misclassified outside the band; ECE,
  Brier, the band's error and coverage then measured on the test split, which took no part.
* The gate (``trainer.model.gate``, stage 1 only, since serving gates before stage 1): the
  learned score fitted on the penultimate features and 8 x 8 layouts of at most
  ``MAX_GATE_TRAIN`` training images (a few thousand estimate 32 principal dimensions well,
  and features of the whole Kaggle train split at 224 px would be gigabytes), thresholded on
  the validation images. Features and layouts are taken batch by batch; pixels are not kept.

A small validation split cannot certify either: below the sizes the model side names
(``certified`` in the gate's info; fewer than ``MIN_BAND_VAL`` images for the band) the card
says so, and the numbers stand as estimates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.model.calibration import (
    Calibration,
    band_error,
    brier,
    calibrate,
    ece,
    fit_calibration,
)

MAX_GATE_TRAIN = 3000
MIN_BAND_VAL = 200
"""Below this many validation images the band's error target is an estimate, not a bound
worth the name (one error more or less moves it by half a point)."""


@dataclass
class Abstention:
    """What a stage learned about its own limits: its calibration, and stage 1's gate."""

    calibration: Calibration
    test: dict[str, float] = field(default_factory=dict)
    gate: Any = None  # trainer.model.gate.InputGate
    layer: str | None = None
    notes: list[str] = field(default_factory=list)


def calibrate_stage(val_p: np.ndarray, val_y: np.ndarray, threshold: float, max_error: float,
                    test_p: np.ndarray, test_y: np.ndarray) -> Abstention:
    """Calibration fitted on validation, its figures measured on test."""
    cal = fit_calibration(val_p, val_y, threshold, max_error)
    q = calibrate(test_p, cal.temperature)
    error, coverage = band_error(q, test_y, cal.threshold, tuple(cal.band))
    test = {"ece_before": ece(test_p, test_y), "ece_after": ece(q, test_y),
            "brier_before": brier(test_p, test_y), "brier_after": brier(q, test_y),
            "error_outside": error, "coverage": coverage, "n_test": int(len(test_y))}
    notes = []
    if len(val_y) < MIN_BAND_VAL:
        notes.append(f"the band was chosen on {len(val_y)} validation images (fewer than "
                     f"{MIN_BAND_VAL}): its error target is not certified")
    return Abstention(cal, {k: round(v, 5) if isinstance(v, float) else v
                            for k, v in test.items()}, notes=notes)


def _features_and_layouts(runner, batches: Iterable[np.ndarray], limit: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    from trainer.model.gate import layouts

    feats, lays, n = [], [], 0
    for x in batches:
        x = np.asarray(x, dtype=np.float32)[: limit - n]
        if not len(x):
            break
        feats.append(runner.predict(x)[0])
        lays.append(layouts(x))
        n += len(x)
    return np.concatenate(feats), np.concatenate(lays)


def fit_stage_gate(runner, train_batches: Iterable[np.ndarray],
                   val_batches: Iterable[np.ndarray], max_false_refusal: float = 0.01):
    """(InputGate, notes) for a ``FeatureModel``: fitted on training images (at most
    ``MAX_GATE_TRAIN``), each part thresholded on validation for half the false refusals."""
    from trainer.model.gate import LAYOUT_DIMS, InputGate
    from trainer.model.ood import fit_gate

    f_tr, l_tr = _features_and_layouts(runner, train_batches, MAX_GATE_TRAIN)
    f_val, l_val = _features_and_layouts(runner, val_batches, 10 ** 9)
    half = max_false_refusal / 2
    features = fit_gate(f_tr, f_val, half)
    lay = fit_gate(l_tr, l_val, half, LAYOUT_DIMS)
    features.info["input"], lay.info["input"] = "features", "layout"
    notes = []
    if not (features.info.get("certified") and lay.info.get("certified")):
        notes.append(f"the gate's thresholds come from {len(f_val)} validation images, too few"
                     f" to certify {max_false_refusal:.0%} false refusals at 90 % confidence;"
                     " they are the largest validation scores (or a fitted tail) instead")
    return InputGate(features, lay), notes


def card_entry(abstention: Abstention) -> dict[str, Any]:
    """The ``abstention`` entry of metrics.json: calibration (validation and test figures),
    the band, and the gate's thresholds and whether they are certified."""
    cal = abstention.calibration
    entry: dict[str, Any] = {"calibration": cal.to_dict(), "test": abstention.test,
                             "notes": abstention.notes}
    if abstention.gate is not None:
        g = abstention.gate
        entry["gate"] = {part: {"threshold": float(getattr(g, part).threshold),
                                **{k: getattr(g, part).info.get(k) for k in
                                   ("dims", "n_fit", "n_threshold", "certified")}}
                         for part in ("features", "layout")}
    return entry


def report_lines(entry: dict[str, Any]) -> list[str]:
    """The model card's section on calibration, the band and the gate (markdown lines)."""
    cal, test = entry["calibration"], entry["test"]
    m = cal.get("metrics", {})
    lo, hi = cal["band"]
    lines = ["", "## Calibration, uncertain band and input gate", "",
             f"Temperature {cal['temperature']:.3f} (fitted on {m.get('n_val')} validation "
             f"images); calibrated threshold {cal['threshold']:.4f}. See reliability.png.", "",
             "| | ECE | Brier |", "|---|---|---|",
             *(f"| {split}, {when} | {src.get(f'ece_{when}', 0):.4f} |"
               f" {src.get(f'brier_{when}', 0):.4f} |"
               for split, src in (("validation", m), ("test", test))
               for when in ("before", "after")), "",
             f"Uncertain band [{lo:.4f}, {hi:.4f}) for at most {cal['max_error']:.0%} errors"
             f" outside it: validation error outside {cal['error_outside']:.4f}, coverage"
             f" {cal['coverage']:.3f}; test error outside {test['error_outside']:.4f}, coverage"
             f" {test['coverage']:.3f}. Inside the band the label stands, flagged for review."]
    for part, g in (entry.get("gate") or {}).items():
        lines.append(f"- input gate, {part}: threshold {g['threshold']:.3f}, {g['dims']}"
                     f" dimensions, fitted on {g['n_fit']}, thresholded on {g['n_threshold']}"
                     f" ({'certified' if g['certified'] else 'NOT certified'})")
    lines += [f"- **Not certified:** {note}." for note in entry.get("notes", [])]
    return lines


def _pixels(dataset, stride: int = 1):
    """Raw pixel batches of a (x, y) tf.data dataset, every ``stride``-th batch."""
    for i, (x, _) in enumerate(dataset):
        if i % stride == 0:
            yield x.numpy()


def fit_abstention(model, data, config, threshold: float, test_p: np.ndarray,
                   test_y) -> Abstention:
    """For ``train_stage``: calibration and band on validation (``config.max_error``), and for
    stage 1 the input gate (training images, spread evenly over the split when there are more
    than ``MAX_GATE_TRAIN``, thresholded on validation)."""
    from trainer.model.bundle import Manifest
    from trainer.model.gate_bundle import FeatureModel
    from trainer.training.phases import predict_scores

    val_p = predict_scores(model, data.val)
    result = calibrate_stage(val_p, data.val_y, threshold, config.max_error,
                             np.asarray(test_p), np.asarray(test_y))
    if config.stage != "pneumonia" or not config.gate:
        return result
    manifest = Manifest(stage=config.stage, version=0, class_names=["NORMAL", "PNEUMONIA"],
                        input_size=config.img_size, backbone=config.backbone,
                        preprocessing="none", preprocessing_in_model=True)
    runner = FeatureModel.from_model(model, manifest)
    stride = max(1, -(-len(data.train_y) // MAX_GATE_TRAIN))
    result.gate, notes = fit_stage_gate(runner, _pixels(data.plain_train, stride),
                                        _pixels(data.val))
    result.layer = runner.layer
    result.notes += notes
    return result
