"""What a ``cxr bench`` run is given: its configuration, synthetic X-ray files at Kaggle-like
sizes (each copy with a unique JPEG comment, so its content hash differs and the service
cannot link it to an earlier prediction without inference) and a model with random weights
(speed does not depend on them) published as the production pneumonia model."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from db.vocabulary import STAGE_CLASSES, Stage
from worker.settings import Settings

CEILING_BATCHES = (1, 4, 8, 16, 32)
Progress = Callable[[str], None]
"""Every step reports its progress lines through one of these (``print`` by default)."""


@dataclass
class BenchConfig:
    """One benchmark run. ``batch_size`` is the images per forward pass, ``message_size`` per
    message;
    ``burst`` files (0: skip) measure how fast the watcher alone takes a burst."""

    backbone: str = "mobilenetv2"
    img_size: int = 224
    images: int = 200
    batch_size: int = 16
    message_size: int = 128
    burst: int = 0
    notebook_images: int = 40
    latency_images: int = 12
    latency_gap_s: float = 1.0
    stable_seconds: float = 1.0
    source_px: tuple[int, int] = (900, 1400)
    ceiling_batches: tuple[int, ...] = CEILING_BATCHES
    min_time_s: float = 2.0
    work_dir: Path | None = None
    seed: int = 0
    redis_db: int = 12
    heatmaps: bool = False
    shadow: bool = False
    baseline: str = ""  # "script": also run the user's tf.data script (bench_script)
    perf: bool = False  # profile the whole machine with Linux perf (bench_native)
    extra_env: dict[str, str] = field(default_factory=dict)


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: same pixels, different bytes."""
    payload = text.encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def make_sources(out: Path, n_base: int, source_px: tuple[int, int], seed: int) -> list[bytes]:
    """``n_base`` synthetic X-ray JPEGs (bytes) at ``source_px`` sides."""
    from trainer.synth.xrays import held_out_images

    written = held_out_images(out, n_base, seed=seed, size_range=source_px)
    return [path.read_bytes() for path, _ in written]


def unique_files(sources: list[bytes], out: Path, prefix: str, n: int) -> list[Path]:
    """``n`` distinct files cycling over ``sources`` (written outside the inbox)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"{prefix}-{i:05d}.jpeg"
        path.write_bytes(_with_comment(sources[i % len(sources)], f"{prefix}-{i}-{uuid.uuid4()}"))
        paths.append(path)
    return paths


def copy_into(inbox: Path, path: Path) -> float:
    """Copy a file into the inbox the safe way (hidden temp name, then rename); the time it
    landed (``time.time()``)."""
    tmp = inbox / f".{path.name}.part"
    shutil.copyfile(path, tmp)
    os.rename(tmp, inbox / path.name)
    return time.time()



FREE = "free"
"""The near-free model: pooling and one dense layer, what VGG16 costs the CPU when a GPU runs
it. With it the pipeline's rate is the control plane and decoding, nothing else."""


def build_free_model(img_size: int):
    import keras

    from trainer.model.preprocessing import Preprocess

    inputs = keras.Input((img_size, img_size, 3))
    x = Preprocess("scale01")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="free")


def register_random_bundle(settings: Settings, backbone: str, img_size: int,
                           threshold: float = 0.5, promote: bool = True) -> Path:
    """Build ``backbone`` with random weights and publish it as the production pneumonia model
    (``threshold`` 0: every image is positive)."""
    from trainer.model.bundle import Manifest
    from trainer.training.backbones import build_classifier, get_spec
    from trainer.training.publish import publish_model

    if backbone == FREE:
        model, preprocessing = build_free_model(img_size), "scale01"
    else:
        model, _ = build_classifier(backbone, img_size, weights="none")
        preprocessing = get_spec(backbone).preprocessing
    manifest = Manifest(
        stage=Stage.PNEUMONIA, version=0, class_names=list(STAGE_CLASSES[Stage.PNEUMONIA]),
        input_size=img_size, threshold=threshold, backbone=backbone, preprocessing=preprocessing,
        preprocessing_in_model=True, output="sigmoid", synthetic=True,
        params={"bench": True, "weights": "none"}, code_version="bench",
    )
    return publish_model(model, manifest, models_dir=settings.models_path,
                         db_url=settings.db_url, promote=promote).bundle_dir
