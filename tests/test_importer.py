"""Model import: .keras and .h5 files become registered bundles that preprocess like the source."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_models import limit_tf_threads

limit_tf_threads()

import keras  # noqa: E402

from db import registry  # noqa: E402
from db.exceptions import ImportModelError  # noqa: E402
from db.session import session_scope  # noqa: E402
from trainer.imaging.checksum import sha256_file  # noqa: E402
from trainer.model.bundle import bundle_sha256, load_bundle  # noqa: E402
from trainer.training.importer import import_model  # noqa: E402

SIZE = 16


def _model(units: int, activation: str | None):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(units, activation=activation)(x))


def _images(n=4):
    return np.random.default_rng(3).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize(
    ("suffix", "units", "activation", "logits", "preprocess", "reference"),
    [
        (".keras", 1, "sigmoid", False, "vgg16", keras.applications.vgg16.preprocess_input),
        (".h5", 2, "softmax", False, "densenet121", keras.applications.densenet.preprocess_input),
        (".keras", 2, None, True, "tf", keras.applications.xception.preprocess_input),
    ],
)
def test_import_matches_manual_preprocessing(
    db_url, tmp_path, suffix, units, activation, logits, preprocess, reference
):
    model = _model(units, activation)
    src = tmp_path / f"external{suffix}"
    model.save(src)
    models_dir = tmp_path / "models"
    version = import_model(
        src,
        stage="infection",
        input_size=SIZE,
        preprocess=preprocess,
        logits=logits,
        models_dir=models_dir,
        db_url=db_url,
    )
    assert version == 1
    with session_scope(db_url) as session:
        row = registry.get_version(session, "infection", 1)
        assert row.status == "candidate" and row.backbone == "imported"
        assert row.params["source_file"] == src.name
        assert row.params["source_sha256"] == sha256_file(src)
        directory = models_dir / row.bundle_path
        assert row.bundle_sha256 == bundle_sha256(directory)
    bundle = load_bundle(directory)
    assert not bundle.manifest.preprocessing_in_model
    assert bundle.manifest.class_names == ["BACTERIA", "VIRUS"]
    x = _images()
    y = keras.ops.convert_to_numpy(model(reference(x.copy()), training=False))
    if logits:
        y = np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    np.testing.assert_allclose(bundle.predict_proba(x), y[:, -1], rtol=1e-5, atol=1e-6)


def test_import_rejects_mismatches(db_url, tmp_path):
    kwargs = dict(stage="pneumonia", preprocess="scale01", models_dir=tmp_path / "m", db_url=db_url)
    three = tmp_path / "three.keras"
    inputs = keras.Input((SIZE, SIZE, 3))
    keras.Model(
        inputs,
        keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)),
    ).save(three)
    with pytest.raises(ImportModelError, match="1 or 2 units"):
        import_model(three, input_size=SIZE, **kwargs)
    raw = tmp_path / "raw.keras"
    _model(1, None).save(raw)
    with pytest.raises(ImportModelError, match="--logits"):
        import_model(raw, input_size=SIZE, **kwargs)
    sigmoid = tmp_path / "sigmoid.keras"
    _model(1, "sigmoid").save(sigmoid)
    with pytest.raises(ImportModelError, match="drop --logits"):
        import_model(sigmoid, input_size=SIZE, logits=True, **kwargs)
    with pytest.raises(ImportModelError, match="--input-size 32"):
        import_model(raw, input_size=32, logits=True, **kwargs)
    with pytest.raises(ImportModelError, match="unknown preprocessing"):
        import_model(raw, input_size=SIZE, **{**kwargs, "preprocess": "sobel"})
    with session_scope(db_url) as session:
        assert registry.list_versions(session) == []
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").rglob("model.keras"))


def test_import_refuses_lambda_models(db_url, tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    src = tmp_path / "lambda.keras"
    keras.Model(inputs, out).save(src)
    with pytest.raises(ImportModelError, match="safe mode"):
        import_model(
            src,
            stage="pneumonia",
            input_size=SIZE,
            preprocess="none",
            models_dir=tmp_path / "m",
            db_url=db_url,
        )


def test_import_can_promote(db_url, tmp_path):
    src = tmp_path / "m.keras"
    _model(1, "sigmoid").save(src)
    version = import_model(
        src,
        stage="pneumonia",
        input_size=SIZE,
        preprocess="none",
        models_dir=tmp_path / "m",
        db_url=db_url,
        promote=True,
    )
    with session_scope(db_url) as session:
        assert registry.get_production(session, "pneumonia").version == version


def test_import_refuses_what_it_cannot_feed(db_url, tmp_path):
    """A greyscale model with a preprocessing that needs three channels, a colour mode that
    contradicts the model's input, two outputs, an unknown resize: each a clear refusal."""
    kwargs = dict(stage="pneumonia", input_size=SIZE, models_dir=tmp_path / "m", db_url=db_url)
    inputs = keras.Input((SIZE, SIZE, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    grey = tmp_path / "grey.keras"
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)).save(grey)
    with pytest.raises(ImportModelError, match="needs 3 colour channels"):
        import_model(grey, preprocess="vgg16", **kwargs)
    with pytest.raises(ImportModelError, match="--color-mode rgb does not fit"):
        import_model(grey, preprocess="scale01", color_mode="rgb", **kwargs)
    with pytest.raises(ImportModelError, match="--resize must be one of"):
        import_model(grey, preprocess="scale01", resize="sinc", **kwargs)
    two = tmp_path / "two.keras"
    heads = [keras.layers.Dense(1, activation="sigmoid")(pooled) for _ in range(2)]
    keras.Model(inputs, heads).save(two)
    with pytest.raises(ImportModelError, match="2 outputs"):
        import_model(two, preprocess="scale01", **kwargs)
    with session_scope(db_url) as session:
        assert registry.list_versions(session) == []
