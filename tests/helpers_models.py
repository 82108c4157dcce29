"""Tiny real model bundles for tests, whose answer the caller controls by brightness.

The tiny model is ``Preprocess("scale01") -> GlobalAveragePooling2D -> Dense(1, sigmoid)`` with
fixed weights, so for an image whose mean pixel value (over all pixels and channels) is ``m``
in 0-255::

    p(class_names[1]) = sigmoid(12 * (m / 255 - 0.5) + bias)

With ``bias=0``: black (0) gives p ~ 0.0025, mid grey (127.5) gives 0.5, white (255) gives
p ~ 0.9975. So bright images are PNEUMONIA (stage "pneumonia") or VIRUS (stage "infection"),
dark ones NORMAL or BACTERIA. ``bias`` shifts every probability (positive -> higher p).

``conv=True`` puts a 1x1 convolution giving each pixel's brightness (0-1) before the pooling:
the same answers, and a feature map for Grad-CAM, whose heatmap for the positive class is then
the image's brightness (the hottest point is the brightest pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from db.vocabulary import STAGE_CLASSES
from trainer.model.bundle import Manifest, save_bundle

BRIGHTNESS_GAIN = 12.0


def tiny_probability(mean_pixel: float, bias: float = 0.0) -> float:
    """The probability the tiny model gives an image with this mean pixel value (0-255)."""
    return 1.0 / (1.0 + math.exp(-(BRIGHTNESS_GAIN * (mean_pixel / 255.0 - 0.5) + bias)))


def limit_tf_threads(n: int = 1) -> None:
    """Cap TensorFlow's thread pools (tests share few cores); a no-op once TF has started."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        pass


def build_tiny_model(input_size: int = 32, bias: float = 0.0, conv: bool = False):
    """The brightness model described in the module docstring (raw RGB 0-255 in)."""
    import keras

    from trainer.model.preprocessing import Preprocess

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = Preprocess("scale01", name="preprocess")(inputs)
    if conv:
        brightness = keras.layers.Conv2D(1, 1, use_bias=False, name="brightness")
        x = brightness(x)
        brightness.set_weights([np.full((1, 1, 3, 1), 1.0 / 3.0, dtype=np.float32)])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    dense = keras.layers.Dense(1, activation="sigmoid", name="head")
    outputs = dense(x)
    gain = BRIGHTNESS_GAIN if conv else BRIGHTNESS_GAIN / 3.0
    dense.set_weights(
        [
            np.full((1 if conv else 3, 1), gain, dtype=np.float32),
            np.array([bias - BRIGHTNESS_GAIN / 2.0], dtype=np.float32),
        ]
    )
    return keras.Model(inputs, outputs, name="tiny_brightness")


def tiny_manifest(
    stage: str, version: int, input_size: int = 32, threshold: float = 0.5, **extra
) -> Manifest:
    """A manifest for the tiny model; ``extra`` overrides fields (e.g. metrics)."""
    values = dict(
        stage=stage,
        version=version,
        class_names=list(STAGE_CLASSES[stage]),
        input_size=input_size,
        threshold=threshold,
        backbone="tiny",
        preprocessing="scale01",
        preprocessing_in_model=True,
        output="sigmoid",
        synthetic=True,
        params={"tiny": True},
    )
    values.update(extra)
    return Manifest(**values)


def make_tiny_bundle(
    models_dir: Path,
    stage: str,
    version: int,
    input_size: int = 32,
    threshold: float = 0.5,
    bias: float = 0.0,
    conv: bool = False,
) -> Path:
    """Write a real tiny bundle at ``models_dir/<stage>/v<version>``; returns that folder."""
    model = build_tiny_model(input_size, bias, conv)
    manifest = tiny_manifest(
        stage, version, input_size, threshold, params={"tiny": True, "bias": bias}
    )
    return save_bundle(model, manifest, Path(models_dir) / stage / f"v{version}")


def register_tiny_bundle(
    db_url: str,
    models_dir: Path,
    stage: str,
    promote: bool = True,
    input_size: int = 32,
    threshold: float = 0.5,
    bias: float = 0.0,
    conv: bool = False,
    metrics: dict | None = None,
) -> int:
    """Publish a tiny bundle in the model registry (optionally promoted); returns its version."""
    from trainer.training.publish import publish_model

    manifest = tiny_manifest(stage, 0, input_size, threshold, params={"tiny": True, "bias": bias},
                             code_version="test", metrics=metrics or {})
    published = publish_model(build_tiny_model(input_size, bias, conv), manifest,
                              models_dir=models_dir, db_url=db_url, promote=promote)
    return published.version


def load_images(paths: Sequence[Path | str], img_size: int, batch_size: int = 64) -> np.ndarray:
    """All images through the training pipeline, as one (N, S, S, 3) float32 array."""
    from trainer.training.dataset import make_dataset

    ds = make_dataset(paths, [0] * len(paths), img_size, batch_size, cache=False)
    chunks = [x.numpy() for x, _ in ds]
    if not chunks:
        return np.zeros((0, img_size, img_size, 3), dtype=np.float32)
    return np.concatenate(chunks)
