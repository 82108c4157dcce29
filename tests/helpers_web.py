"""Results for the review app's tests, written through the product's own db functions: real
archived PNGs (hash-checked when the app decodes them), real heatmap PNGs, registered
versions with manifests, and a shadow prediction beside a production one."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image as PILImage

from db import registry
from db.images import record_image
from db.models import Image
from db.predictions import save_predictions
from db.session import session_scope
from db.vocabulary import ImageStatus

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("NORMAL", "BACTERIA", "VIRUS", "NORMAL", "BACTERIA")


def _png(seed: int, label: str = "NORMAL", size: int = 128) -> bytes:
    """A synthetic chest X-ray of ``label`` (trainer.synth's drawing) as PNG bytes."""
    import numpy as np

    from trainer.synth.xrays import render_xray

    pixels = render_xray(np.random.default_rng(seed), label, size, size)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _heatmap(seed: int, size: int = 64) -> bytes:
    """A heatmap-like picture: the X-ray in grey with a red patch where the model 'looked'."""
    import numpy as np

    grey = np.asarray(PILImage.open(io.BytesIO(_png(seed, "BACTERIA", size))))
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size]
    blob = np.exp(-((xs - size * 0.35) ** 2 + (ys - size * 0.6) ** 2) / (2 * (size / 8) ** 2))
    rgb[..., 0] = rgb[..., 0] * (1 - blob) + 255 * blob
    rgb[..., 1:] *= (1 - 0.7 * blob)[..., None]
    out = io.BytesIO()
    PILImage.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def register_stage(session, models_dir: Path, stage: str, input_size: int = 48) -> int:
    """A production version of ``stage`` whose manifest names ``input_size`` (no model file:
    the app only reads the manifest)."""
    from db.vocabulary import STAGE_CLASSES
    from trainer.model.bundle import MANIFEST_FILE, Manifest

    model = registry.register_version(session, stage=stage, backbone="smallcnn",
                                      metrics={"test_auc": 0.91, "test_accuracy": 0.875})
    registry.promote(session, stage, model.version)
    folder = models_dir / model.bundle_path
    folder.mkdir(parents=True, exist_ok=True)
    Manifest(stage=stage, version=model.version, class_names=list(STAGE_CLASSES[stage]),
             input_size=input_size).write(folder / MANIFEST_FILE)
    return model.id


def seed(db_url: str, data_dir: Path, n: int = 5) -> list[int]:
    """``n`` done images (labels cycling through ``LABELS``), positives with a heatmap, the
    first one also predicted by a shadow version; image ids, oldest first."""
    ids = []
    with session_scope(db_url) as session:
        first = register_stage(session, data_dir / "models", "pneumonia")
        second = register_stage(session, data_dir / "models", "infection")
        shadow = registry.register_version(session, stage="pneumonia", backbone="smallcnn").id
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            data = _png(i, label)
            sha = hashlib.sha256(data).hexdigest()
            stored = f"archive/{sha[:2]}/{sha}.png"
            _write(data_dir / stored, data)
            heatmap = None
            if label != "NORMAL":
                heatmap = f"heatmaps/{sha[:2]}/{sha}-p{first}-i{second}.png"
                _write(data_dir / heatmap, _heatmap(i))
            image = record_image(session, sha256=sha, file_name=f"chest-{i}.png",
                                 stored_path=stored, size_bytes=len(data),
                                 status=ImageStatus.DONE)
            image.accession_number = f"ACC{4711 + i}"  # DICOM identifiers, made up
            image.study_instance_uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
            positive = label != "NORMAL"
            rows = [{"sha256": sha, "pneumonia_model_id": first,
                     "infection_model_id": second if positive else None,
                     "p_pneumonia": 0.9 if positive else 0.1,
                     "p_virus": (0.8 if label == "VIRUS" else 0.2) if positive else None,
                     "label": label, "threshold": 0.5,
                     "infection_threshold": 0.5 if positive else None,
                     "heatmap_path": heatmap}]
            if i == 0:
                rows.append({**rows[0], "pneumonia_model_id": shadow, "p_pneumonia": 0.7,
                             "label": "BACTERIA", "heatmap_path": None})
            prediction_ids = save_predictions(session, rows)
            session.get(Image, image.id).prediction_id = prediction_ids[0]
            ids.append(image.id)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """`cxr web` as a real server process; returns once it answers."""
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT), "CXR_WEB_PORT": str(port)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "web"], env=full, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cxr web exited: {log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=1).close()
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"cxr web did not answer: {log.read_text()}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
