"""The phases of transfer learning for one stage (the Keras guide's steps): compile, train the
head on the frozen base (on its cached pooled features, computed once, or on images through
it every epoch), then unfreeze the top of the base (BatchNorm kept frozen), recompile at a low
rate and fine-tune; a model trained from scratch (smallcnn) trains end to end instead.
``trainer.training.train`` chooses the phases and evaluates the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from trainer.training.train import TrainConfig

TIMING_BATCHES = 3


class KeepBest(keras.callbacks.Callback):
    """Best-so-far checkpoint (in memory) of ``target`` on ``monitor``, kept across phases.

    Phase 1 may fit a head model that shares layers with ``target``; the snapshot is always of
    the full model so the end result is the best model seen in either phase.
    """

    def __init__(self, target, monitor: str = "val_auc") -> None:
        super().__init__()
        self.target = target
        self.monitor = monitor
        self.best = -np.inf
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and value > self.best:
            self.best = float(value)
            self.best_weights = self.target.get_weights()

    def restore(self) -> None:
        if self.best_weights is not None:
            self.target.set_weights(self.best_weights)


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, for the cached-versus-uncached comparison."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def _metrics() -> list:
    return [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]


def compile_model(model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=_metrics(),
    )


def split_head(model, base):
    """(features, head) models sharing ``model``'s layers: features end at the pooled vector.

    The head is the chain of layers after the first rank-2 output at or after ``base``;
    training the head model trains those layers of ``model`` itself.
    """
    layers = model.layers
    start = layers.index(base)
    cut = next(
        i for i in range(start, len(layers)) if len(layers[i].output.shape) == 2
    )
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    features = keras.Model(inputs, layers[cut].output, name="features")
    x = inputs = keras.Input(layers[cut].output.shape[1:], name="pooled")
    for layer in layers[cut + 1 :]:
        x = layer(x)
    return features, keras.Model(inputs, x, name="head")


@tf.function(reduce_retracing=True)
def _infer(model, x):
    """One compiled function for every model: a new ``tf.function`` per call would trace anew
    each time (and TensorFlow warns about it); here each model traces once or twice."""
    return model(x, training=False)


def predict_scores(model, dataset: tf.data.Dataset) -> np.ndarray:
    """Positive-class probabilities for a dataset, via one compiled function (no ``predict``)."""
    chunks = [np.asarray(_infer(model, x)).reshape(-1) for x, _ in dataset]
    return np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.float32)


def _features(features_model, dataset: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([np.asarray(_infer(features_model, x)) for x, _ in dataset])


def _timed_image_batches(model, dataset: tf.data.Dataset, steps: int, n_batches: int) -> float:
    """Seconds per epoch when the head trains on images through the frozen base, measured on a
    few batches and scaled to ``steps``; the weights are put back afterwards."""
    saved = model.get_weights()
    probe = dataset.take(n_batches + 1)
    model.fit(probe.take(1), epochs=1, verbose=0, shuffle=False)  # compile and warm up, not timed
    start = time.perf_counter()
    model.fit(probe.skip(1), epochs=1, verbose=0, shuffle=False)
    elapsed = time.perf_counter() - start
    model.set_weights(saved)
    return elapsed / n_batches * steps


@dataclass
class StageData:
    """One stage's datasets: augmented training batches, plain ones (for features), validation."""

    train: tf.data.Dataset
    plain_train: tf.data.Dataset
    val: tf.data.Dataset
    train_y: np.ndarray
    val_y: np.ndarray
    class_weight: dict[int, float]
    steps: int


def _stopper(config: TrainConfig) -> keras.callbacks.EarlyStopping:
    return keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience,
        start_from_epoch=config.min_epochs,
    )


def _fit(model, data: StageData, config: TrainConfig, keep: KeepBest, epochs: int,
         verbose: int) -> tuple[dict[str, list[float]], float]:
    """Fit on image batches with early stopping on validation AUC; (history, median epoch s)."""
    timer = EpochTimer()
    fit = model.fit(
        data.train, validation_data=data.val, epochs=epochs, class_weight=data.class_weight,
        callbacks=[keep, _stopper(config), timer], verbose=verbose, shuffle=False,
    )
    return fit.history, float(np.median(timer.times))


def train_end_to_end(model, data, config, keep, verbose) -> tuple[dict, dict]:
    """A from-scratch model (smallcnn): every layer trains from the first epoch."""
    compile_model(model, config.learning_rate)
    history, epoch_s = _fit(model, data, config, keep, config.epochs, verbose)
    return history, {"epoch_s": epoch_s}


def train_head_on_features(model, base, data, config, keep, verbose) -> tuple[dict, dict]:
    """Phase 1 on cached pooled features of the frozen base (computed once, no augmentation).

    The uncached epoch time is measured on a few image batches through the frozen base, so
    the report can state the ratio measured in this run.
    """
    compile_model(model, config.learning_rate)
    features, head = split_head(model, base)
    compile_model(head, config.learning_rate)
    t0 = time.perf_counter()
    train_f, val_f = _features(features, data.plain_train), _features(features, data.val)
    extraction_s = time.perf_counter() - t0
    timer = EpochTimer()
    fit = head.fit(
        train_f, data.train_y, batch_size=config.batch_size, validation_data=(val_f, data.val_y),
        epochs=config.epochs, class_weight=data.class_weight, shuffle=True,
        callbacks=[keep, _stopper(config), timer], verbose=verbose,
    )
    cached_s = float(np.median(timer.times))
    uncached_s = _timed_image_batches(
        model, data.train, data.steps, min(TIMING_BATCHES, max(data.steps - 1, 1))
    )
    return fit.history, {
        "feature_extraction_s": extraction_s,
        "cached_epoch_s": cached_s,
        "uncached_epoch_s": uncached_s,
        "epoch_time_ratio": uncached_s / max(cached_s, 1e-9),
    }


def train_head_through_base(model, data, config, keep, verbose) -> tuple[dict, dict]:
    """Phase 1 without the cache: images (augmented) through the frozen base every epoch."""
    compile_model(model, config.learning_rate)
    history, epoch_s = _fit(model, data, config, keep, config.epochs, verbose)
    return history, {"uncached_epoch_s": epoch_s}


def fine_tune(model, base, data, config, keep, verbose) -> tuple[dict, dict]:
    """Phase 2: unfreeze the top of the base (BatchNorm stays frozen), recompile at a low rate."""
    from trainer.training.backbones import get_spec, unfreeze_top

    n_layers = config.unfreeze_layers
    if n_layers is None:
        n_layers = get_spec(config.backbone).fine_tune_layers
    unfreeze_top(base, n_layers)
    compile_model(model, config.fine_tune_learning_rate)
    history, epoch_s = _fit(model, data, config, keep, config.fine_tune_epochs, verbose)
    return history, {"fine_tune_epoch_s": epoch_s}
