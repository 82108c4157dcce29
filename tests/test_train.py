"""Training for real: a small CNN learns the synthetic set, bundles round-trip, the CLI registers.

Models and images are tiny so the whole module stays within a few CPU minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_models import limit_tf_threads

limit_tf_threads(2)

SIZE = 64
N_IMAGES = 600


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from trainer.synth.xrays import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "chest_xray"
    generate_dataset(root, N_IMAGES, 0)
    return root


@pytest.fixture(scope="module")
def synth_splits(synth_root):
    from trainer.training.data import scan_dataset, split_records

    return split_records(scan_dataset(synth_root), val_fraction=0.2, seed=0)


def _bundle_files(bundle: Path) -> set[str]:
    return {p.name for p in bundle.iterdir()}


@pytest.fixture(scope="module")
def pneumonia_result(synth_splits, tmp_path_factory):
    """One real training run shared by the tests below (it is the expensive part)."""
    from trainer.training.train import TrainConfig, train_stage

    # Without augmentation the small CNN converges within the CPU budget (measured 0.95 test
    # accuracy, AUC 1.0, in about 80 s on 2 shared cores); the CLI test below trains augmented.
    config = TrainConfig(stage="pneumonia", backbone="smallcnn", img_size=SIZE, epochs=20,
                         batch_size=16, learning_rate=3e-3, augment=False, weights="none",
                         patience=8, n_boot=200)
    out = tmp_path_factory.mktemp("run")
    return train_stage(synth_splits, config, out, synthetic=True, verbose=0)


@pytest.mark.slow
def test_smallcnn_learns_pneumonia_on_synthetic_data(pneumonia_result, synth_root):
    from trainer.training.data import is_synthetic

    result = pneumonia_result
    test = result.metrics["test"]
    assert test["accuracy"] >= 0.9, test
    assert test["auc"] >= 0.95
    assert test["ci95"]["auc"][0] <= test["auc"] <= test["ci95"]["auc"][1]
    assert result.metrics["val"]["sensitivity"] >= 0.95  # the tuned operating point
    reference = result.metrics["reference"]  # what `cxr monitor` measures drift against
    assert reference["source"] == "validation" and len(reference["counts"]) == 10
    assert sum(reference["counts"]) == sum(result.metrics["counts"]["val"].values())
    assert result.history["phase"] == [1] * len(result.history["loss"])
    assert is_synthetic(synth_root)


@pytest.mark.slow
def test_publish_registers_and_bundle_round_trips(pneumonia_result, synth_root, synth_splits,
                                                   db_url, tmp_path):
    from helpers_models import load_images

    from db import registry
    from db.session import session_scope
    from trainer.model.bundle import bundle_sha256, load_bundle
    from trainer.training.data import dataset_fingerprint, scan_dataset
    from trainer.training.train import OUTPUT_FILES, publish

    result = pneumonia_result
    test = result.metrics["test"]
    fingerprint = dataset_fingerprint(scan_dataset(synth_root), synth_root)
    mv = publish(result, models_dir=tmp_path / "models", db_url=db_url,
                 dataset_fingerprint=fingerprint, promote=True)
    bundle = tmp_path / "models" / "pneumonia" / "v1"
    assert set(OUTPUT_FILES) <= _bundle_files(bundle)
    with session_scope(db_url) as session:
        prod = registry.get_production(session, "pneumonia")
        assert (prod.version, prod.bundle_path, prod.dataset_fingerprint) == (
            mv.version, "pneumonia/v1", fingerprint)
        assert prod.bundle_sha256 == bundle_sha256(bundle)
        assert prod.metrics["test"]["accuracy"] == test["accuracy"]
        assert prod.params["backbone"] == "smallcnn"

    loaded = load_bundle(bundle)
    assert loaded.manifest.threshold == pytest.approx(result.threshold)
    assert loaded.manifest.synthetic and loaded.manifest.class_names == ["NORMAL", "PNEUMONIA"]
    paths = [r.path for r in synth_splits.test[:24]]
    images = load_images(paths, SIZE)
    expected = np.asarray(result.model(images, training=False)).reshape(-1)
    np.testing.assert_allclose(loaded.predict_proba(images), expected, atol=1e-5)
    np.testing.assert_allclose(loaded.predict_proba(images.astype(np.uint8)),
                               np.asarray(result.model(images.astype(np.uint8).astype(np.float32),
                                                       training=False)).reshape(-1), atol=1e-5)
    report = (bundle / "report.md").read_text()
    assert "Synthetic data" in report and "not a medical device" in report


@pytest.mark.slow
def test_training_puts_gate_and_calibration_in_the_bundle_and_card(pneumonia_result, db_url,
                                                                   tmp_path):
    """Issue 22 at training time: stage 1's gate fitted on its training images and thresholded
    on validation, calibration and band on validation, both in the published bundle; the card
    gives ECE and Brier before and after, the reliability diagram, and what is not certified
    (this validation split has about a hundred films)."""
    from trainer.model.bundle import load_bundle
    from trainer.model.gate_bundle import load_gate
    from trainer.training.train import publish

    entry = pneumonia_result.metrics["abstention"]
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "error_outside",
            "coverage"} <= set(entry["test"])
    assert entry["gate"]["features"]["n_threshold"] == entry["calibration"]["metrics"]["n_val"]
    assert any("not certified" in note for note in entry["notes"])
    publish(pneumonia_result, models_dir=tmp_path / "models", db_url=db_url,
            dataset_fingerprint=None)
    bundle = load_bundle(tmp_path / "models" / "pneumonia" / "v1")
    assert bundle.manifest.calibration["temperature"] > 0
    assert bundle.manifest.gate["source"] == "training"
    assert load_gate(bundle).features.threshold == pytest.approx(
        entry["gate"]["features"]["threshold"])
    assert (bundle.directory / "reliability.png").stat().st_size > 1000
    report = (bundle.directory / "report.md").read_text()
    assert "## Calibration, uncertain band and input gate" in report
    assert "ECE" in report and "Not certified" in report


@pytest.mark.slow
def test_cli_trains_both_stages_promotes_and_fine_tunes_from_a_version(
    synth_root, tmp_path, monkeypatch, capsys
):
    from db import registry
    from db.migrate import upgrade
    from db.session import session_scope
    from trainer.model.bundle import load_bundle
    from worker.cli import main

    db_url = f"sqlite:///{tmp_path / 'cxr.db'}"  # one backend: the registry is covered above
    upgrade(db_url)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", db_url)
    base = ["train", "--data", str(synth_root), "--backbone", "smallcnn", "--weights", "none",
            "--img-size", "48", "--batch-size", "32", "--seed", "1"]
    assert main([*base, "--stage", "both", "--epochs", "4", "--promote"]) == 0
    out = capsys.readouterr().out
    assert "pneumonia/v1" in out and "infection/v1" in out and "cascade" in out

    models = tmp_path / "var" / "models"
    with session_scope(db_url) as session:
        pneu = registry.get_production(session, "pneumonia")
        inf = registry.get_production(session, "infection")
        assert pneu.version == inf.version == 1
        assert inf.metrics["counts"]["train"]["1"] > 0  # VIRUS images were used
        cascade = inf.metrics["cascade"]
        assert cascade["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
        assert cascade["n"] == pneu.metrics["test"]["n"]
        assert sum(map(sum, cascade["confusion"])) == cascade["n"]
    manifest = load_bundle(models / "infection" / "v1").manifest
    assert manifest.class_names == ["BACTERIA", "VIRUS"] and manifest.input_size == 48
    assert json.loads((models / "infection" / "v1" / "metrics.json").read_text())["synthetic"]
    assert (models / "infection" / "v1" / "confusion.png").stat().st_size > 1000

    assert main([*base, "--stage", "pneumonia", "--epochs", "1",
                 "--init-from", "pneumonia:1"]) == 0
    with session_scope(db_url) as session:
        child = registry.get_version(session, "pneumonia", 2)
        assert child.parent_version == 1 and child.status == "candidate"
        assert child.params["init_from"] == "pneumonia:1"
        assert registry.get_production(session, "pneumonia").version == 1


def test_cli_refuses_a_database_behind(empty_db_url, tmp_path, monkeypatch, capsys):
    from db.migrate import current_revision, upgrade
    from worker.cli import main

    upgrade(empty_db_url, "0001")
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", empty_db_url)
    assert main(["train", "--data", str(tmp_path), "--backbone", "smallcnn"]) == 2
    assert "cxr db upgrade" in capsys.readouterr().err
    assert current_revision(empty_db_url) == "0001", "an old schema is never upgraded silently"


def test_cli_gives_a_brand_new_database_its_schema(tmp_path, monkeypatch, capsys):
    from db.migrate import current_revision, head_revision
    from worker.cli import main

    url = f"sqlite:///{tmp_path / 'new.db'}"
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", url)
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--backbone", "smallcnn"]) == 2
    out = capsys.readouterr()
    assert "created the database schema" in out.out and "nowhere" in out.err
    assert current_revision(url) == head_revision()


def test_head_split_shares_layers_with_the_model():
    import keras

    from trainer.training.backbones import build_classifier
    from trainer.training.phases import split_head

    keras.utils.set_random_seed(0)
    model, base = build_classifier("mobilenetv2", 32, "none")
    features, head = split_head(model, base)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    f = np.asarray(features(x, training=False))
    assert f.shape == (4, base.output.shape[-1])
    np.testing.assert_allclose(np.asarray(head(f, training=False)),
                               np.asarray(model(x, training=False)), atol=1e-5)
    before = model.get_layer("head").get_weights()[0].copy()
    head.compile(optimizer=keras.optimizers.SGD(1.0), loss="binary_crossentropy")
    random_features = np.random.default_rng(1).normal(size=f.shape).astype(np.float32)
    head.fit(random_features, np.array([0, 1, 0, 1], np.float32), epochs=1, verbose=0)
    assert not np.allclose(model.get_layer("head").get_weights()[0], before)


@pytest.mark.slow
def test_feature_cache_path_with_a_pretrained_style_backbone(tmp_path):
    import keras
    from test_data import make_kaggle

    from trainer.training.data import scan_dataset, split_records
    from trainer.training.train import TrainConfig, train_stage

    root = make_kaggle(tmp_path / "d", patients=8, per_patient=2, test_patients=3)
    splits = split_records(scan_dataset(root), val_fraction=0.3, seed=0)
    config = TrainConfig(stage="pneumonia", backbone="mobilenetv2", img_size=32, epochs=1,
                         fine_tune_epochs=1, batch_size=8, weights="none", n_boot=20,
                         unfreeze_layers=10)
    result = train_stage(splits, config, tmp_path / "run", verbose=0)
    timing = result.metrics["timing"]
    for key in ("feature_extraction_s", "cached_epoch_s", "uncached_epoch_s",
                "epoch_time_ratio", "fine_tune_epoch_s"):
        assert timing[key] > 0, key
    assert result.history["phase"] == [1, 2]
    base = next(layer for layer in result.model.layers if isinstance(layer, keras.Model))
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    assert any(layer.trainable for layer in base.layers[-10:])
    assert "ratio" in (tmp_path / "run" / "report.md").read_text()
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())["timing"]) == set(timing)
