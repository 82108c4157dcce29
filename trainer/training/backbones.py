"""Backbone registry and the one classifier shape every stage uses.

``build_classifier`` gives raw RGB 0-255 -> ``Preprocess`` (the backbone's own mode) ->
backbone (``include_top=False``, called with ``training=False`` so BatchNorm keeps its ImageNet
statistics while fine-tuning) -> global average pooling -> dropout -> one sigmoid unit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from db.exceptions import WeightsUnavailableError
from trainer.model.preprocessing import BACKBONE_MODES, Preprocess

MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and how to fine-tune it.

    ``fine_tune_layers``: layers at the top of the base unfrozen in phase 2 by default (about one
    block). ``min_size``: smallest square input Keras accepts. ``weights_file``: the notop
    ImageNet file Keras caches (``{rows}`` filled in for MobileNetV2).
    """

    name: str
    constructor: str | None
    fine_tune_layers: int
    min_size: int
    weights_file: str | None
    default_size: int = 224

    @property
    def preprocessing(self) -> str:
        return BACKBONE_MODES[self.name]

    @property
    def pretrained(self) -> bool:
        return self.constructor is not None


def _spec(name, constructor, fine_tune, min_size, weights_file, default_size=224):
    return BackboneSpec(name, constructor, fine_tune, min_size, weights_file, default_size)


_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _spec("vgg16", "VGG16", 4, 32, "vgg16" + _NOTOP),
        _spec("vgg19", "VGG19", 5, 32, "vgg19" + _NOTOP),
        _spec("xception", "Xception", 16, 71, "xception" + _NOTOP, 299),
        _spec("resnet50", "ResNet50", 33, 32, "resnet50" + _NOTOP),
        _spec("resnet50v2", "ResNet50V2", 35, 32, "resnet50v2" + _NOTOP),
        _spec("inceptionv3", "InceptionV3", 31, 75, "inception_v3" + _NOTOP, 299),
        _spec("densenet121", "DenseNet121", 52, 32, "densenet121" + _NOTOP),
        _spec(
            "mobilenetv2",
            "MobileNetV2",
            20,
            32,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        ),
        _spec("efficientnetb0", "EfficientNetB0", 20, 32, "efficientnetb0_notop.h5"),
        _spec("smallcnn", None, 0, 32, None, 96),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}"
        ) from None


def weights_file_name(name: str, input_size: int) -> str | None:
    """The file Keras looks for in its cache for ``name``'s notop ImageNet weights."""
    spec = get_spec(name)
    if spec.weights_file is None:
        return None
    rows = input_size if input_size in MOBILENET_V2_ROWS else 224
    return spec.weights_file.format(rows=rows)


def keras_models_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``.

    Mirrors ``keras.utils.get_file``, including its ``/tmp/.keras`` fallback for a read-only home.
    """
    try:
        from keras.src.backend.config import keras_home

        home = os.path.expanduser(keras_home())
    except ImportError:
        home = os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras")
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def _imagenet_base(spec: BackboneSpec, input_shape: tuple[int, int, int]):
    constructor: Callable = getattr(keras.applications, spec.constructor)
    try:
        return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
    except Exception as exc:
        file_name = weights_file_name(spec.name, input_shape[0])
        if (keras_models_dir() / file_name).is_file():
            raise
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} are not available ({exc}). Download "
            f"{file_name} and put it in {keras_models_dir()}/ (~/.keras/models/ or "
            f"$KERAS_HOME/models), or pass --weights PATH to an .h5/.weights.h5 file, "
            f"or --weights none to train from scratch."
        ) from exc


def _load_base_weights(base, path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.name.endswith(".weights.h5") or path.suffix == ".keras":
        base.load_weights(path, skip_mismatch=True)
    else:
        base.load_weights(path, skip_mismatch=True, by_name=True)


def small_cnn(x, filters: tuple[int, ...] = (16, 32, 64, 96)):
    """A small from-scratch CNN (inline layers, no nested base): fast on CPU at 64-128 px.

    BatchNorm momentum 0.9 (not 0.99): a CPU run has only a few hundred steps, and slower
    moving statistics would lag the weights at inference.
    """
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    return x


def build_classifier(
    name: str, input_size: int, weights: str | Path = "imagenet", dropout: float = 0.2
):
    """(model, base) for raw RGB 0-255 input; ``base`` is None for ``smallcnn`` (no backbone).

    ``weights``: "imagenet" (Keras's cache or download), "none" (random), or a path to weights
    for the base. Raises WeightsUnavailableError offline, naming the file to place and where.
    """
    spec = get_spec(name)
    if input_size < spec.min_size:
        raise ValueError(f"{spec.name} needs input_size >= {spec.min_size}, got {input_size}")
    shape = (input_size, input_size, 3)
    inputs = keras.Input(shape, name="image")
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    base = None
    if spec.pretrained:
        weights_str = str(weights)
        if weights_str == "imagenet":
            base = _imagenet_base(spec, shape)
        else:
            constructor = getattr(keras.applications, spec.constructor)
            base = constructor(include_top=False, weights=None, input_shape=shape)
            if weights_str.lower() != "none":
                _load_base_weights(base, Path(weights_str))
        x = base(x, training=False)
    else:
        x = small_cnn(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier"), base


def freeze_base(base) -> None:
    """Phase 1: the backbone is a fixed feature extractor."""
    if base is not None:
        base.trainable = False


def unfreeze_top(base, n_layers: int) -> None:
    """Phase 2: unfreeze the top ``n_layers`` of the base, keeping BatchNormalization frozen.

    Frozen BatchNorm keeps ImageNet statistics that small medical batches would wreck.
    """
    if base is None:
        return
    base.trainable = True
    layers = base.layers
    cut = max(len(layers) - max(int(n_layers), 0), 0)
    for i, layer in enumerate(layers):
        trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
