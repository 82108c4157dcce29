"""Backbone registry: every backbone builds and trains; offline ImageNet errors say what to do."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
from helpers_models import limit_tf_threads

limit_tf_threads()

import keras  # noqa: E402

from db.exceptions import WeightsUnavailableError  # noqa: E402
from trainer.model.preprocessing import Preprocess  # noqa: E402
from trainer.training.backbones import (  # noqa: E402
    BACKBONES,
    build_classifier,
    freeze_base,
    get_spec,
    unfreeze_top,
    weights_file_name,
)

SLOW = {"xception", "inceptionv3", "densenet121", "resnet50", "resnet50v2", "efficientnetb0"}
REQUIRED = {
    "vgg16",
    "vgg19",
    "xception",
    "resnet50",
    "resnet50v2",
    "inceptionv3",
    "densenet121",
    "mobilenetv2",
    "efficientnetb0",
    "smallcnn",
}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(names)]


def _one_train_step(model, size):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)
    y = np.ones((2, 1), np.float32)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)
    p = keras.ops.convert_to_numpy(model(x, training=False))
    assert p.shape == (2, 1) and np.all((p >= 0) & (p <= 1))


def test_registry_covers_required_backbones():
    assert set(BACKBONES) >= REQUIRED
    assert get_spec("VGG16").preprocessing == "caffe"
    assert get_spec("densenet121").preprocessing == "torch"
    assert get_spec("efficientnetb0").preprocessing == "efficientnet"
    assert not get_spec("smallcnn").pretrained
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        get_spec("alexnet")


@pytest.mark.parametrize("name", _params(BACKBONES))
def test_backbone_builds_and_trains_one_step(name):
    spec = get_spec(name)
    model, base = build_classifier(name, spec.min_size, weights="none")
    assert tuple(model.inputs[0].shape) == (None, spec.min_size, spec.min_size, 3)
    pre = model.get_layer("preprocess")
    assert isinstance(pre, Preprocess) and pre.mode == spec.preprocessing
    assert (base is None) == (not spec.pretrained)
    freeze_base(base)
    _one_train_step(model, spec.min_size)


def test_input_size_below_minimum_is_refused():
    with pytest.raises(ValueError, match="xception needs input_size >= 71"):
        build_classifier("xception", 64, weights="none")


def test_unfreeze_top_keeps_batchnorm_frozen():
    _, base = build_classifier("mobilenetv2", 32, weights="none")
    freeze_base(base)
    assert not base.trainable and base.trainable_weights == []
    unfreeze_top(base, 12)
    top = base.layers[-12:]
    assert all(
        layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in top
    )
    assert not any(layer.trainable for layer in base.layers[:-12])
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in top)


def test_weights_path_loads_into_base(tmp_path):
    _, source = build_classifier("vgg16", 32, weights="none")
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    _, base = build_classifier("vgg16", 32, weights=path)
    for a, b in zip(source.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_classifier("vgg16", 32, weights=tmp_path / "missing.h5")


@pytest.mark.parametrize(
    ("name", "size", "file_name"),
    [
        ("vgg16", 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("mobilenetv2", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"),
    ],
)
def test_offline_imagenet_error_names_the_file(monkeypatch, tmp_path, name, size, file_name):
    """No network here: the download is made to fail the way urllib fails offline."""
    import keras.src.backend.config as keras_config
    import keras.src.utils.file_utils as file_utils

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    assert weights_file_name(name, size) == file_name
    with pytest.raises(WeightsUnavailableError) as info:
        build_classifier(name, size, weights="imagenet")
    message = str(info.value)
    assert file_name in message
    assert str(tmp_path / "models") in message
    assert "--weights PATH" in message


@pytest.mark.parametrize("name", ["smallcnn", "mobilenetv2", "vgg16"])
def test_classifier_bundle_round_trip_in_safe_mode(tmp_path, name):
    from trainer.model.bundle import Manifest, load_bundle, save_bundle

    spec = get_spec(name)
    model, _ = build_classifier(name, 32, weights="none")
    manifest = Manifest(
        stage="pneumonia",
        version=1,
        class_names=["NORMAL", "PNEUMONIA"],
        input_size=32,
        backbone=name,
        preprocessing=spec.preprocessing,
    )
    bundle = load_bundle(save_bundle(model, manifest, tmp_path / "v1"))
    x = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(x, training=False))[:, 0]
    np.testing.assert_allclose(bundle.predict_proba(x), expected, rtol=1e-5, atol=1e-6)
