"""Backbone input preprocessing as a registered Keras layer.

Models carry their preprocessing inside, so training and serving cannot disagree. A registered
layer class (not a ``Lambda``) lets bundles load with ``safe_mode=True``. Each mode reproduces
the matching ``keras.applications.<backbone>.preprocess_input`` for channels-last RGB 0-255.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)

MODES = ("none", "scale01", "tf", "caffe", "torch", "efficientnet")

BACKBONE_MODES: dict[str, str] = {
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet50": "caffe",
    "resnet101": "caffe",
    "resnet152": "caffe",
    "xception": "tf",
    "inceptionv3": "tf",
    "inceptionresnetv2": "tf",
    "mobilenet": "tf",
    "mobilenetv2": "tf",
    "resnet50v2": "tf",
    "resnet101v2": "tf",
    "densenet121": "torch",
    "densenet169": "torch",
    "densenet201": "torch",
    "efficientnetb0": "efficientnet",
    "efficientnetb1": "efficientnet",
    "efficientnetb2": "efficientnet",
    "efficientnetb3": "efficientnet",
    "smallcnn": "scale01",
}


def resolve_mode(name: str) -> str:
    """The preprocessing mode for a mode name or a backbone name (as manifests may hold either)."""
    key = name.lower()
    if key in MODES:
        return key
    if key in BACKBONE_MODES:
        return BACKBONE_MODES[key]
    known = ", ".join(sorted(set(MODES) | set(BACKBONE_MODES)))
    raise ValueError(f"unknown preprocessing {name!r}; expected one of: {known}")


@keras.saving.register_keras_serializable(package="cxr")
class Preprocess(keras.layers.Layer):
    """Maps raw RGB pixels 0-255 (channels last) to what a backbone expects."""

    def __init__(self, mode: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = resolve_mode(mode)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode in ("none", "efficientnet"):
            return x
        if self.mode == "scale01":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=self.compute_dtype)
        mean = ops.convert_to_tensor(IMAGENET_RGB_MEAN, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(IMAGENET_RGB_STD, dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}
