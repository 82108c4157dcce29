"""Two-phase transfer learning for one stage, then a versioned, registered bundle.

Follows the Keras transfer-learning guide: build (backbone with its preprocessing inside,
called with ``training=False``), train the head on the frozen base, unfreeze the top layers
(BatchNorm kept frozen), recompile at a lower learning rate and fine-tune (the phases
themselves are in ``trainer.training.phases``). Phase 1 can run on cached pooled features of
the frozen base: the base runs once instead of once per epoch, which is the big CPU win (the
measured epoch-time ratio goes into the metrics). The decision threshold is tuned on
validation for a target sensitivity; the test split is only evaluated.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from db.exceptions import DatasetError
from db.vocabulary import STAGE_CLASSES
from trainer.training import evaluate, model_card, monitoring_stats, plots
from trainer.training.abstain import card_entry, fit_abstention, report_lines
from trainer.training.calibration_plots import plot_reliability
from trainer.training.data import Splits, class_weights, stage_view
from trainer.training.dataset import batches, decoded_dataset, make_dataset
from trainer.training.phases import (
    KeepBest,
    StageData,
    fine_tune,
    predict_scores,
    train_end_to_end,
    train_head_on_features,
    train_head_through_base,
)

log = logging.getLogger(__name__)

OUTPUT_FILES = ("metrics.json", "roc.png", "confusion.png", "curves.png", "report.md",
                "reliability.png")


@dataclass
class TrainConfig:
    """Every knob of one training run; stored as the bundle's ``params``.

    ``unfreeze_layers``: top layers of the base trained in phase 2 (None: the backbone's default).
    ``min_epochs``: early stopping never stops a phase before this many epochs (validation AUC
    of a model trained from scratch is noise for the first few).
    """

    stage: str
    backbone: str = "vgg16"
    img_size: int = 224
    epochs: int = 10
    fine_tune_epochs: int = 5
    batch_size: int = 32
    weights: str = "imagenet"
    seed: int = 0
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    unfreeze_layers: int | None = None
    patience: int = 5
    min_epochs: int = 5
    target_sensitivity: float = 0.95
    feature_cache: bool = True
    augment: bool = True
    flip: bool = False
    n_boot: int = 1000
    val_fraction: float | None = None
    init_from: str | None = None
    max_error: float = 0.05
    """Error rate allowed outside the uncertain band (chosen on validation)."""
    gate: bool = True
    """Fit stage 1's input gate on the training images (``trainer.training.abstain``)."""


@dataclass
class TrainResult:
    """The trained model (best validation AUC weights) and everything measured about it."""

    model: Any
    config: TrainConfig
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    threshold: float
    test_labels: np.ndarray
    test_scores: np.ndarray
    out_dir: Path
    synthetic: bool = False
    parent_version: int | None = None
    abstention: Any = None
    """``trainer.training.abstain.Abstention``: calibration, band and (stage 1) gate."""


def build_model(config: TrainConfig, init_model_path: Path | None = None):
    """(model, base): a new classifier from the backbone registry, or a copy of an existing model.

    ``base`` is the frozen-able backbone, or None for a model trained end to end (smallcnn).
    """
    from trainer.training.backbones import build_classifier

    if init_model_path is None:
        return build_classifier(config.backbone, config.img_size, config.weights)
    from trainer.model.bundle import load_keras_model

    model = load_keras_model(init_model_path)
    size = model.inputs[0].shape[1]
    if size != config.img_size:
        raise DatasetError(
            f"--init-from model takes {size} px images; use --img-size {size}"
        )
    return model, find_base(model)


def find_base(model):
    """The nested backbone (a Model layer with weights) inside a classifier, or None."""
    nested = [
        layer for layer in model.layers if isinstance(layer, keras.Model) and layer.weights
    ]
    return max(nested, key=lambda m: len(m.weights)) if nested else None


def _merge(history: dict[str, list[float]], new: dict[str, list[float]], phase: int) -> None:
    for key, values in new.items():
        history.setdefault(key, []).extend(float(v) for v in values)
    history.setdefault("phase", []).extend([phase] * len(next(iter(new.values()), [])))


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def stage_data(splits: Splits, config: TrainConfig) -> tuple[StageData, tf.data.Dataset, list]:
    """(StageData, test batches, test labels) for ``config.stage``; decodes each image once."""
    stage, size, bs = config.stage, config.img_size, config.batch_size
    train_paths, train_y = stage_view(splits.train, stage)
    val_paths, val_y = stage_view(splits.val, stage)
    test_paths, test_y = stage_view(splits.test, stage)
    for name, ys in (("validation", val_y), ("test", test_y)):
        if len(set(ys)) < 2:
            raise DatasetError(f"the {name} split of stage {stage} lacks one of its two classes")
    decoded = decoded_dataset(train_paths, train_y, size)
    data = StageData(
        train=batches(decoded, bs, training=True, augment=config.augment, flip=config.flip,
                      seed=config.seed),
        plain_train=batches(decoded, bs),
        val=make_dataset(val_paths, val_y, size, bs),
        train_y=np.asarray(train_y, np.float32),
        val_y=np.asarray(val_y, np.float32),
        class_weight=class_weights(train_y),
        steps=int(np.ceil(len(train_paths) / bs)),
    )
    return data, make_dataset(test_paths, test_y, size, bs, cache=False), test_y


def evaluate_stage(model, data: StageData, test_ds, test_y: list[int], config: TrainConfig):
    """(threshold, test scores, metrics): the threshold comes from validation only; the test
    split is scored once with it."""
    val_y = data.val_y.astype(int).tolist()
    val_scores = predict_scores(model, data.val)
    threshold = evaluate.threshold_for_sensitivity(val_y, val_scores, config.target_sensitivity)
    test_scores = predict_scores(model, test_ds)
    val_metrics = evaluate.threshold_metrics(val_y, val_scores, threshold)
    val_metrics["auc"] = evaluate.roc_auc(val_y, val_scores)
    metrics: dict[str, Any] = {
        "stage": config.stage,
        "class_names": STAGE_CLASSES[config.stage],
        "threshold": threshold,
        "target_sensitivity": config.target_sensitivity,
        "test": evaluate.evaluate_binary(
            test_y, test_scores, threshold, n_boot=config.n_boot, seed=config.seed
        ),
        "val": val_metrics,
        "counts": {
            "train": _counts(data.train_y.astype(int).tolist()),
            "val": _counts(val_y),
            "test": _counts(list(test_y)),
        },
        "class_weights": {str(k): v for k, v in data.class_weight.items()},
        "reference": reference_histogram(val_scores),
    }
    return threshold, test_scores, metrics


def reference_histogram(val_scores) -> dict[str, Any]:
    """The validation probabilities as a histogram: what `cxr monitor` compares served
    probabilities with (drift) before any ground truth arrives."""
    return {"source": "validation", "edges": list(monitoring_stats.PROBABILITY_EDGES),
            "counts": monitoring_stats.histogram(val_scores)}


def train_stage(
    splits: Splits,
    config: TrainConfig,
    out_dir: Path | str,
    *,
    init_model_path: Path | None = None,
    parent_version: int | None = None,
    synthetic: bool = False,
    verbose: int | None = None,
) -> TrainResult:
    """Train one stage, tune its threshold on validation, evaluate on test, write the outputs.

    Writes ``metrics.json``, ``roc.png``, ``confusion.png``, ``curves.png`` and ``report.md``
    into ``out_dir``; registering the bundle is ``publish``'s job. The returned model holds the
    weights of the best validation AUC over both phases.
    """
    keras.utils.set_random_seed(config.seed)
    verbose = _verbose() if verbose is None else verbose
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, test_ds, test_y = stage_data(splits, config)
    model, base = build_model(config, init_model_path)
    keep = KeepBest(model)
    history: dict[str, list[float]] = {}
    timing: dict[str, float] = {}
    if base is None:
        phase, times = train_end_to_end(model, data, config, keep, verbose)
        _merge(history, phase, 1)
        timing.update(times)
    else:
        from trainer.training.backbones import freeze_base

        freeze_base(base)
        if config.epochs > 0:
            if config.feature_cache:
                phase, times = train_head_on_features(model, base, data, config, keep, verbose)
            else:
                phase, times = train_head_through_base(model, data, config, keep, verbose)
            _merge(history, phase, 1)
            timing.update(times)
            keep.restore()
        if config.fine_tune_epochs > 0:
            phase, times = fine_tune(model, base, data, config, keep, verbose)
            _merge(history, phase, 2)
            timing.update(times)
    keep.restore()
    threshold, test_scores, metrics = evaluate_stage(model, data, test_ds, test_y, config)
    abstention = fit_abstention(model, data, config, threshold, test_scores, test_y)
    metrics["abstention"] = card_entry(abstention)
    metrics.update(
        best_val_auc=keep.best if np.isfinite(keep.best) else None,
        timing=timing,
        epochs_run=len(history.get("loss", [])),
        synthetic=synthetic,
    )
    result = TrainResult(model, config, history, metrics, threshold, np.asarray(test_y),
                         test_scores, out_dir, synthetic, parent_version, abstention)
    write_outputs(result)
    return result


def _counts(labels: list[int]) -> dict[str, int]:
    return {"0": int(labels.count(0)), "1": int(labels.count(1))}


def write_outputs(result: TrainResult) -> None:
    """metrics.json, the three plots and report.md in ``result.out_dir`` (rewritten on update)."""
    out, stage = result.out_dir, result.config.stage
    names = STAGE_CLASSES[stage]
    (out / "metrics.json").write_text(
        json.dumps(_json_safe(result.metrics), indent=2, sort_keys=True) + "\n"
    )
    title = f"{stage} ({result.config.backbone})"
    plots.plot_curves(result.history, out / "curves.png", title=title, synthetic=result.synthetic)
    plots.plot_roc(
        result.test_labels, result.test_scores, out / "roc.png", title=title,
        synthetic=result.synthetic, threshold=result.threshold,
    )
    plots.plot_confusion(
        np.asarray(result.metrics["test"]["confusion"]), names, out / "confusion.png",
        title=title, synthetic=result.synthetic,
    )
    report = model_card.render_report(result.metrics, asdict(result.config),
                                      synthetic=result.synthetic)
    if result.abstention is not None:
        cal = result.abstention.calibration
        plot_reliability(cal.reliability, out / "reliability.png", title=f"{title} calibration",
                         band=cal.band, synthetic=result.synthetic)
        report = report.replace(f"\n\n{model_card.VALIDITY_NOTE}",
                                "\n".join(["", *report_lines(result.metrics["abstention"])])
                                + f"\n\n{model_card.VALIDITY_NOTE}", 1)
    (out / "report.md").write_text(report)


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def publish(
    result: TrainResult,
    *,
    models_dir: Path | str,
    db_url: str,
    dataset_fingerprint: str | None,
    promote: bool = False,
):
    """Register this run's model with its evaluation outputs (``trainer.training.publish``)."""
    from trainer.model.bundle import Manifest
    from trainer.model.preprocessing import BACKBONE_MODES
    from trainer.training.publish import publish_model

    config = result.config
    params = _json_safe(asdict(config))
    manifest = Manifest(
        stage=config.stage, version=0, class_names=list(STAGE_CLASSES[config.stage]),
        input_size=config.img_size, threshold=float(result.threshold), backbone=config.backbone,
        preprocessing=BACKBONE_MODES.get(config.backbone, "none"), preprocessing_in_model=True,
        output="sigmoid", metrics=_json_safe(result.metrics), params=params,
        dataset_fingerprint=dataset_fingerprint, parent_version=result.parent_version,
        synthetic=result.synthetic,
    )
    extras = _attach_abstention(manifest, result.abstention)
    published = publish_model(
        result.model, manifest, models_dir=models_dir, db_url=db_url,
        extra_files=[result.out_dir / name for name in OUTPUT_FILES], promote=promote,
        extras=extras,
    )
    log.info("registered %s (%s) at %s", published.name, published.status, published.bundle_dir)
    return published


def _attach_abstention(manifest, abstention) -> dict[str, bytes]:
    """Calibration into ``manifest.calibration``, the gate into ``manifest.gate`` and its file
    into the returned extras (nothing for a result without them)."""
    if abstention is None:
        return {}
    manifest.calibration = _json_safe(abstention.calibration.to_dict())
    if abstention.gate is None:
        return {}
    from trainer.model.gate_bundle import attach_gate

    return attach_gate(manifest, abstention.gate, abstention.layer)


def score_paths(predict, paths: list[Path], img_size: int, batch_size: int = 32) -> np.ndarray:
    """``predict`` (raw 0-255 batch -> positive probabilities) over image files, batch by batch."""
    ds = make_dataset(paths, [0] * len(paths), img_size, batch_size, cache=False)
    chunks = [np.asarray(predict(x.numpy()), dtype=np.float64).reshape(-1) for x, _ in ds]
    return np.concatenate(chunks) if chunks else np.zeros((0,))


def model_predictor(model):
    """A batch predictor for a trainer model, through one compiled function."""

    @tf.function(reduce_retracing=True)
    def step(x):
        return model(x, training=False)

    return lambda x: np.asarray(step(tf.convert_to_tensor(x, tf.float32))).reshape(-1)


def evaluate_cascade_on(
    test_records, pneumonia: tuple, infection: tuple, batch_size: int = 32
) -> dict[str, Any]:
    """Three-class cascade on every test image; each stage is (predict, img_size, threshold)."""
    paths = [r.path for r in test_records]
    p1 = score_paths(pneumonia[0], paths, pneumonia[1], batch_size)
    p2 = score_paths(infection[0], paths, infection[1], batch_size)
    return evaluate.evaluate_cascade(
        [r.label3 for r in test_records], p1, p2, pneumonia[2], infection[2]
    )
