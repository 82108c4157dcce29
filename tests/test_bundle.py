"""Model bundles and preprocessing layers: round trips, output kinds, safe mode, bad bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_models import limit_tf_threads

limit_tf_threads()

import keras  # noqa: E402
from helpers_models import make_tiny_bundle, tiny_probability  # noqa: E402

from db.exceptions import ModelNotFoundError  # noqa: E402
from trainer.model.bundle import (  # noqa: E402
    Manifest,
    bundle_sha256,
    load_bundle,
    save_bundle,
)
from trainer.model.preprocessing import BACKBONE_MODES, Preprocess, resolve_mode  # noqa: E402

APPLICATION_PREPROCESS = {
    "vgg16": keras.applications.vgg16.preprocess_input,
    "vgg19": keras.applications.vgg19.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "xception": keras.applications.xception.preprocess_input,
    "inceptionv3": keras.applications.inception_v3.preprocess_input,
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "resnet50v2": keras.applications.resnet_v2.preprocess_input,
    "densenet121": keras.applications.densenet.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
}


def _pixels(n=2, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("backbone", sorted(APPLICATION_PREPROCESS))
def test_preprocess_layer_matches_keras_applications(backbone):
    x = _pixels()
    expected = APPLICATION_PREPROCESS[backbone](x.copy())
    got = keras.ops.convert_to_numpy(Preprocess(backbone)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_scale01_and_none_modes():
    x = _pixels()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(Preprocess("scale01")(x)), x / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(Preprocess("none")(x)), x)


def test_modes_actually_differ():
    x = _pixels()
    outs = {m: keras.ops.convert_to_numpy(Preprocess(m)(x)) for m in ("tf", "caffe", "torch")}
    assert not np.allclose(outs["tf"], outs["caffe"])
    assert not np.allclose(outs["tf"], outs["torch"])


def test_resolve_mode_accepts_modes_and_backbones_and_rejects_unknown():
    assert resolve_mode("VGG16") == "caffe"
    assert resolve_mode("tf") == "tf"
    assert all(resolve_mode(name) == mode for name, mode in BACKBONE_MODES.items())
    with pytest.raises(ValueError, match="unknown preprocessing 'sobel'"):
        resolve_mode("sobel")


def test_manifest_round_trip_ignores_unknown_keys(tmp_path):
    m = Manifest(
        stage="pneumonia",
        version=3,
        class_names=["NORMAL", "PNEUMONIA"],
        input_size=64,
        threshold=0.4,
        metrics={"auc": 0.9},
        parent_version=2,
    )
    path = tmp_path / "manifest.json"
    m.write(path)
    data = json.loads(path.read_text())
    data["from_the_future"] = 1
    path.write_text(json.dumps(data))
    assert Manifest.read(path) == m


def test_manifest_without_resize_keeps_the_service_resize_and_greyscale_round_trips(tmp_path):
    """Manifests written before ``resize`` existed are fed as they always were; an import's
    declared resize and colour mode survive the round trip."""
    from trainer.imaging.decode import SERVICE_RESIZE

    old = dict(stage="pneumonia", version=1, class_names=["NORMAL", "PNEUMONIA"], input_size=32,
               color_mode="rgb")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(old))
    loaded = Manifest.read(path)
    assert loaded.resize == SERVICE_RESIZE and loaded.feed == (32, SERVICE_RESIZE)
    grey = Manifest(**{**old, "color_mode": "grayscale", "resize": "lanczos"})
    grey.write(path)
    assert Manifest.read(path) == grey and grey.channels == 1


@pytest.mark.parametrize(
    "bad",
    [{"class_names": ["A"]}, {"output": "tanh"}, {"threshold": 1.5}, {"color_mode": "bgr"},
     {"resize": "sinc"}],
)
def test_manifest_validates(bad):
    values = dict(stage="pneumonia", version=1, class_names=["NORMAL", "PNEUMONIA"], input_size=32)
    values.update(bad)
    with pytest.raises(ValueError):
        Manifest(**values)


def test_tiny_bundle_maps_brightness_to_probability(tmp_path):
    directory = make_tiny_bundle(tmp_path, "pneumonia", 1, input_size=32)
    assert directory == tmp_path / "pneumonia" / "v1"
    bundle = load_bundle(directory)
    assert bundle.manifest.class_names == ["NORMAL", "PNEUMONIA"]
    assert bundle.manifest.preprocessing_in_model and bundle.manifest.synthetic
    levels = [0, 64, 127.5, 200, 255]
    batch = np.stack([np.full((32, 32, 3), v, np.float32) for v in levels])
    p = bundle.predict_proba(batch)
    assert p.shape == (5,) and p.dtype == np.float32
    np.testing.assert_allclose(p, [tiny_probability(v) for v in levels], atol=1e-5)
    assert p[0] < 0.01 and abs(p[2] - 0.5) < 1e-4 and p[-1] > 0.99
    assert np.all(np.diff(p) > 0)
    uint8 = bundle.predict_proba(batch.astype(np.uint8)[[0, -1]])
    np.testing.assert_allclose(uint8, p[[0, -1]], atol=1e-6)


def test_tiny_bundle_bias_and_infection_classes(tmp_path):
    bundle = load_bundle(
        make_tiny_bundle(tmp_path, "infection", 2, input_size=16, bias=3.0, threshold=0.7)
    )
    assert bundle.manifest.class_names == ["BACTERIA", "VIRUS"]
    assert bundle.manifest.threshold == 0.7
    grey = np.full((1, 16, 16, 3), 127.5, np.float32)
    np.testing.assert_allclose(
        bundle.predict_proba(grey), [tiny_probability(127.5, 3.0)], atol=1e-5
    )


def test_predict_proba_rejects_wrong_shape_and_handles_empty(tmp_path):
    bundle = load_bundle(make_tiny_bundle(tmp_path, "pneumonia", 1, input_size=32))
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        bundle.predict_proba(np.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError):
        bundle.predict_proba(np.zeros((32, 32, 3)))
    assert bundle.predict_proba(np.zeros((0, 32, 32, 3))).shape == (0,)


def _dense_model(units, activation, size=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    layer = keras.layers.Dense(units, activation=activation)
    out = layer(x)
    rng = np.random.default_rng(1)
    layer.set_weights(
        [rng.normal(size=(3, units)).astype("float32"), rng.normal(size=(units,)).astype("float32")]
    )
    return keras.Model(inputs, out)


@pytest.mark.parametrize(
    ("units", "activation", "output"),
    [
        (1, "sigmoid", "sigmoid"),
        (2, "softmax", "softmax"),
        (1, None, "logits"),
        (2, None, "logits"),
    ],
)
def test_output_kinds_and_external_preprocessing(tmp_path, units, activation, output):
    model = _dense_model(units, activation)
    manifest = Manifest(
        stage="pneumonia",
        version=1,
        class_names=["NORMAL", "PNEUMONIA"],
        input_size=8,
        preprocessing="torch",
        preprocessing_in_model=False,
        output=output,
    )
    bundle = load_bundle(save_bundle(model, manifest, tmp_path / "b"))
    x = _pixels(n=3, size=8, seed=5)
    raw = keras.ops.convert_to_numpy(model(keras.applications.densenet.preprocess_input(x.copy())))
    if output == "logits":
        raw = (
            1 / (1 + np.exp(-raw))
            if units == 1
            else np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)
        )
    np.testing.assert_allclose(bundle.predict_proba(x), raw[:, -1], rtol=1e-5, atol=1e-6)


def test_save_refuses_mismatches_and_overwrite(tmp_path):
    manifest = Manifest(
        stage="pneumonia",
        version=1,
        class_names=["NORMAL", "PNEUMONIA"],
        input_size=8,
        output="softmax",
    )
    with pytest.raises(ValueError, match="output units"):
        save_bundle(_dense_model(1, "sigmoid"), manifest, tmp_path / "b")
    manifest.input_size = 16
    manifest.output = "sigmoid"
    with pytest.raises(ValueError, match="input_size"):
        save_bundle(_dense_model(1, "sigmoid"), manifest, tmp_path / "b")
    manifest.input_size = 8
    save_bundle(_dense_model(1, "sigmoid"), manifest, tmp_path / "b")
    with pytest.raises(FileExistsError):
        save_bundle(_dense_model(1, "sigmoid"), manifest, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_sha256_changes_with_either_file(tmp_path):
    directory = make_tiny_bundle(tmp_path, "pneumonia", 1)
    before = bundle_sha256(directory)
    assert before == bundle_sha256(directory) and len(before) == 64
    manifest = Manifest.read(directory / "manifest.json")
    manifest.threshold = 0.3
    manifest.write(directory / "manifest.json")
    assert bundle_sha256(directory) != before


def test_missing_and_corrupt_bundles_raise_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        load_bundle(tmp_path / "nope")
    directory = make_tiny_bundle(tmp_path, "pneumonia", 1)
    (directory / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelNotFoundError, match="cannot be loaded"):
        load_bundle(directory)
    directory = make_tiny_bundle(tmp_path, "pneumonia", 2)
    (directory / "manifest.json").write_text("{")
    with pytest.raises(ModelNotFoundError, match="manifest"):
        load_bundle(directory)


def test_lambda_models_are_refused_in_safe_mode(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    manifest = Manifest(
        stage="pneumonia", version=1, class_names=["NORMAL", "PNEUMONIA"], input_size=8
    )
    directory = save_bundle(keras.Model(inputs, out), manifest, tmp_path / "b")
    with pytest.raises(ModelNotFoundError, match="cannot be loaded"):
        load_bundle(directory)


def test_register_tiny_bundle_registers_promotes_and_hashes(db_url, tmp_path):
    from helpers_models import register_tiny_bundle

    from db import registry
    from db.session import session_scope

    first = register_tiny_bundle(db_url, tmp_path, "pneumonia")
    second = register_tiny_bundle(db_url, tmp_path, "pneumonia", promote=False, bias=1.0)
    assert (first, second) == (1, 2)
    with session_scope(db_url) as session:
        production = registry.get_production(session, "pneumonia")
        assert production.version == 1
        candidate = registry.get_version(session, "pneumonia", 2)
        assert candidate.status == "candidate"
        directory = tmp_path / candidate.bundle_path
        assert candidate.bundle_sha256 == bundle_sha256(directory)
    assert load_bundle(directory).manifest.version == 2
