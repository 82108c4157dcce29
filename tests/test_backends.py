"""Serving on any Keras backend: bundles saved under TensorFlow, served by worker code started
with ``KERAS_BACKEND=jax`` (which must never import TensorFlow) and with the default
TensorFlow, give the same labels and probabilities.

Each backend runs in its own process (a process has one Keras backend), through the worker's
own path: the model cache reading the registry, the shared decoder, the cascade with stage 2 at
another input size, and bundles whose preprocessing and output activation the loader adds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 10_000_000
SERVING_MODULES = ("worker.classify.batch", "worker.classify.inference",
                   "trainer.imaging.decode", "trainer.model.bundle",
                   "trainer.model.preprocessing", "trainer.model.cascade", "trainer.model.runtime")
# Mean brightness of each test image, kept clear of the tiny models' decision points (127.5 at
# stage 1; 191 at stage 2 with bias -3) so labels cannot flip on float rounding.
MEANS = (20, 90, 150, 165, 215, 240, 60)
THREADS = 2
ATOL = 1e-4  # float32 sums in another order: ~1e-5 apart on a 48 px mean

CHILD = """
import json, os, sys
from pathlib import Path

args = json.loads(sys.argv[1])
for name in args["modules"]:
    __import__(name)
tensorflow_after_imports = "tensorflow" in sys.modules

import keras
import numpy as np

from db.session import session_scope
from trainer.model.bundle import load_bundle
from trainer.imaging.decode import decode_many
from worker.classify.inference import (
    ModelCache,
    classify_arrays,
    predict_in_buckets,
    stage_two_from_files,
)

paths = [Path(p) for p in args["images"]]
cache = ModelCache(Path(args["models_dir"]), warm_batch=4)
with session_scope(args["db_url"]) as session:
    models = cache.current(session)
pixels = np.stack([d.pixels for d in decode_many(paths, models.pneumonia.input_size,
                                                 args["max_pixels"])])
results = classify_arrays(pixels, models.pneumonia, models.infection,
                          stage_two_from_files(paths, args["max_pixels"]))
bundles = {}
for directory in args["bundles"]:
    bundle = load_bundle(Path(directory))
    batch = np.stack([d.pixels for d in decode_many(paths, bundle.manifest.input_size,
                                                    args["max_pixels"])])
    bundles[directory] = predict_in_buckets(bundle, batch).tolist()
threads = None
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads()
print(json.dumps({
    "backend": keras.backend.backend(),
    "tensorflow_after_imports": tensorflow_after_imports,
    "tensorflow_at_end": "tensorflow" in sys.modules,
    "labels": [str(r.label) for r in results],
    "p_pneumonia": [r.p_pneumonia for r in results],
    "p_virus": [r.p_virus for r in results],
    "bundles": bundles,
    "intra_op_threads": threads,
}))
"""


def _images(folder: Path) -> list[Path]:
    """Textured images around the chosen means: PNG and JPEG, grey and colour, not square."""
    rng = np.random.default_rng(7)
    paths = []
    for i, mean in enumerate(MEANS):
        noise = rng.integers(-15, 16, (72, 64 + 8 * i))
        stripes = np.where((np.arange(noise.shape[1]) // 3) % 2 == 0, 10, -10)
        grey = np.clip(mean + noise + stripes, 0, 255).astype(np.uint8)
        if i % 2:
            path = folder / f"img{i}.jpeg"
            PILImage.fromarray(np.stack([grey] * 3, axis=-1)).save(path, quality=95)
        else:
            path = folder / f"img{i}.png"
            PILImage.fromarray(grey).save(path)
        paths.append(path)
    return paths


def _smallcnn_bundle(models_dir: Path) -> Path:
    """A real backbone from trainer.training.backbones (random weights) with Preprocess inside."""
    import keras

    from db.vocabulary import STAGE_CLASSES
    from trainer.model.bundle import Manifest, save_bundle
    from trainer.training.backbones import build_classifier, get_spec

    keras.utils.set_random_seed(3)
    model, _ = build_classifier("smallcnn", 32, weights="none")
    manifest = Manifest(stage="pneumonia", version=90, class_names=list(STAGE_CLASSES["pneumonia"]),
                        input_size=32, backbone="smallcnn",
                        preprocessing=get_spec("smallcnn").preprocessing, synthetic=True)
    return save_bundle(model, manifest, models_dir / "extra" / "smallcnn")


def _imported_bundle(models_dir: Path) -> Path:
    """Preprocessing declared in the manifest (not in the model) and two logits out: the
    loader wraps both around the model."""
    import keras

    from trainer.model.bundle import Manifest, save_bundle

    keras.utils.set_random_seed(5)
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    manifest = Manifest(stage="infection", version=91, class_names=["BACTERIA", "VIRUS"],
                        input_size=40, backbone="custom", preprocessing="vgg16",
                        preprocessing_in_model=False, output="logits")
    return save_bundle(model, manifest, models_dir / "extra" / "imported")


def _serve(backend: str, args: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
    env.update(KERAS_BACKEND=backend, CXR_TF_THREADS=str(THREADS), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{backend} worker failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Bundles saved here under TensorFlow, then served by one process per backend."""
    import keras
    from helpers_models import register_tiny_bundle

    from db.migrate import upgrade

    assert keras.backend.backend() == "tensorflow"  # the bundles come from the trainer's backend
    folder = tmp_path_factory.mktemp("backends")
    db_url = f"sqlite:///{folder / 'cxr.db'}"
    upgrade(db_url)
    models_dir = folder / "models"
    register_tiny_bundle(db_url, models_dir, "pneumonia", input_size=32)
    register_tiny_bundle(db_url, models_dir, "infection", input_size=48, bias=-3.0)
    args = {
        "modules": list(SERVING_MODULES),
        "images": [str(p) for p in _images(folder)],
        "models_dir": str(models_dir),
        "db_url": db_url,
        "bundles": [str(_smallcnn_bundle(models_dir)), str(_imported_bundle(models_dir))],
        "max_pixels": MAX_PIXELS,
    }
    return {backend: _serve(backend, args) for backend in ("tensorflow", "jax")}


def test_a_jax_worker_never_imports_tensorflow(served):
    jax = served["jax"]
    assert jax["backend"] == "jax"
    assert not jax["tensorflow_after_imports"], f"importing {SERVING_MODULES} pulled TensorFlow"
    assert not jax["tensorflow_at_end"], "serving on JAX imported TensorFlow"


def test_tensorflow_and_jax_give_the_same_answers(served):
    tf, jax = served["tensorflow"], served["jax"]
    assert tf["backend"] == "tensorflow"
    assert set(tf["labels"]) == {"NORMAL", "BACTERIA", "VIRUS"}  # every branch of the cascade
    assert jax["labels"] == tf["labels"]
    np.testing.assert_allclose(jax["p_pneumonia"], tf["p_pneumonia"], rtol=0, atol=ATOL)
    assert [p is None for p in jax["p_virus"]] == [p is None for p in tf["p_virus"]]
    np.testing.assert_allclose([p or 0.0 for p in jax["p_virus"]],
                               [p or 0.0 for p in tf["p_virus"]], rtol=0, atol=ATOL)
    for directory, expected in tf["bundles"].items():
        assert np.ptp(expected) > 1e-4, f"{directory} answers every image alike"
        np.testing.assert_allclose(jax["bundles"][directory], expected, rtol=0, atol=ATOL)


def test_tensorflow_threads_follow_the_process_share(served):
    assert served["tensorflow"]["intra_op_threads"] == THREADS
