"""``cxr bench``: how close the pipeline gets to the network's own speed, measured in one run.

Four measurements on the same machine, same model (random weights: speed does not depend on
them), so their ratios mean something even on a busy host:

* ceiling: the compiled forward pass (``LoadedBundle.predict_proba``) on tensors already
  decoded, at the best of a few batch sizes;
* notebook: what the notebooks do, ``load_img`` + ``model.predict`` one file at a time;
* pipeline: the real stack (``cxr up``: watcher + one worker, its own data dir, SQLite, a
  private queue) from K files copied into the inbox until K rows are ``done``;
* latency: files dropped one at a time, spaced out, from landing in the inbox to ``done``;
* heatmaps: what ``CXR_HEATMAPS`` adds per positive image, Grad-CAM and its PNG on the same
  decoded tensors as the ceiling (and, with ``heatmaps``, the pipeline run with them on and
  every image positive: the worst case).

Files are synthetic X-rays at Kaggle-like sizes; each copy gets a unique JPEG comment so its
content hash differs (the service would otherwise link duplicates without inference).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text as sql_text

from db.vocabulary import FINAL_STATUSES, STAGE_CLASSES, Stage
from worker.ops.stack import LocalStack
from worker.settings import Settings

CEILING_BATCHES = (1, 4, 8, 16, 32)
BATCH_LINE = re.compile(r"batch of (\d+): decode (\d+) ms, forward (\d+) ms")
Progress = Callable[[str], None]


@dataclass
class BenchConfig:
    """One benchmark run. ``batch_size`` is the images per forward pass, ``message_size`` per
    message;
    ``burst`` files (0: skip) measure how fast the watcher alone takes a burst."""

    backbone: str = "mobilenetv2"
    img_size: int = 224
    images: int = 200
    batch_size: int = 16
    message_size: int = 64
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
    extra_env: dict[str, str] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def machine_info() -> dict[str, Any]:
    """CPU model, cores, GPUs, TensorFlow/Keras versions and the load average now."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    return {
        "cpu": cpu,
        "cores": cores,
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


# --- inputs ---------------------------------------------------------------------------------


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


# --- the model ------------------------------------------------------------------------------


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
                           threshold: float = 0.5) -> Path:
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
                         db_url=settings.db_url, promote=True).bundle_dir


# --- in-process measurements ----------------------------------------------------------------


def _rate(run: Callable[[], int], min_time_s: float, warm: bool = True) -> float:
    """Images per second of ``run`` (returns images done), repeated for ``min_time_s``."""
    if warm:
        run()  # tracing, allocation
    done, started = 0, time.perf_counter()
    while True:
        done += run()
        elapsed = time.perf_counter() - started
        if elapsed >= min_time_s and done > 0:
            return done / elapsed


def measure_ceiling(bundle, batches: tuple[int, ...], min_time_s: float, progress: Progress,
                    rounds: int = 2) -> dict[str, Any]:
    """The compiled forward pass on decoded tensors, per batch size (best of ``rounds``, taken
    in turn so a busy moment on a shared host hits one round only); the best is the ceiling."""
    size = bundle.manifest.input_size
    rng = np.random.default_rng(0)
    inputs = {n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in batches}
    by_batch: dict[str, float] = {}
    for r in range(rounds):
        for n, x in inputs.items():
            rate = _rate(lambda x=x: len(bundle.predict_proba(x)), min_time_s, warm=r == 0)
            by_batch[str(n)] = max(rate, by_batch.get(str(n), 0.0))
            progress(f"  ceiling round {r + 1}, batch {n:>3}: {rate:8.1f} images/s")
    best = max(by_batch, key=by_batch.get)
    return {"images_per_s": by_batch[best], "batch_size": int(best), "by_batch_size": by_batch}


def measure_heatmaps(bundle, batch: int, min_time_s: float, progress: Progress
                     ) -> dict[str, Any]:
    """Grad-CAM of the positive class and its PNG (what a worker adds per positive image with
    ``CXR_HEATMAPS``; writing the file aside) on decoded tensors, ``batch`` at a time."""
    from trainer.model.explain import explainer_for, grad_cam
    from trainer.model.overlay import render_overlay

    size = bundle.manifest.input_size
    x = np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    explainer = explainer_for(bundle)
    cam_rate = _rate(lambda: len(grad_cam(explainer, x, 1)), min_time_s)

    def with_png() -> int:
        cams = grad_cam(explainer, x, 1)
        for pixels, cam in zip(x, cams, strict=True):
            render_overlay(pixels, cam, "PNEUMONIA", ["bench"])
        return len(cams)

    rate = _rate(with_png, min_time_s)
    progress(f"  heatmaps, batch {batch}: Grad-CAM {cam_rate:.1f} images/s, with the PNG "
             f"{rate:.1f} images/s (layer {explainer.layer})")
    return {"images_per_s": rate, "gradcam_images_per_s": cam_rate, "batch_size": batch,
            "layer": explainer.layer}


def measure_decode(files: list[Path], size: int, min_time_s: float, progress: Progress,
                   max_pixels: int = 60_000_000) -> dict[str, Any]:
    """The decode ceiling: ``trainer.imaging.decode`` on the same files with one thread per core,
    the most a worker on this host could ever classify with a free model."""
    from concurrent.futures import ThreadPoolExecutor

    from trainer.imaging.decode import decode_image

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        def run() -> int:
            return len(list(pool.map(lambda f: decode_image(f, size, max_pixels), files)))

        rate = _rate(run, min_time_s)
    progress(f"  decode ceiling: {rate:.1f} images/s ({threads} threads)")
    return {"images_per_s": rate, "threads": threads, "images": len(files)}


def measure_notebook(model, files: list[Path], size: int, progress: Progress) -> dict[str, Any]:
    """The notebooks' loop: load_img + img_to_array + ``model.predict`` on one image at a time."""
    import keras

    def one(path: Path) -> None:
        img = keras.utils.load_img(path, color_mode="rgb", target_size=(size, size))
        x = keras.utils.img_to_array(img)[None]
        model.predict(x, verbose=0)

    one(files[0])
    started = time.perf_counter()
    for i, path in enumerate(files, start=1):
        one(path)
        if i % 10 == 0:
            progress(f"  notebook: {i}/{len(files)}")
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(files) / elapsed, "images": len(files), "seconds": elapsed}


# --- the real stack -------------------------------------------------------------------------


class Stack:
    """``cxr up --no-flower`` in a private data dir, and what the bench reads of it."""

    def __init__(self, settings: Settings, env: dict[str, str], log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.local = LocalStack(env, log_path, "--no-flower", "--concurrency", "1")

    def statuses(self, names: list[str]) -> dict[str, tuple[str, datetime | None, datetime]]:
        from sqlalchemy import select

        from db.models import Image
        from db.session import session_scope

        with session_scope(self.settings.db_url) as session:
            rows = session.execute(
                select(Image.file_name, Image.status, Image.finished_at, Image.received_at)
                .where(Image.file_name.in_(names))
            ).all()
        return {r.file_name: (r.status, r.finished_at, r.received_at) for r in rows}

    def wait_done(self, names: list[str], timeout: float, poll: float = 0.1) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.statuses(names)
            if len(rows) == len(names) and all(
                s in FINAL_STATUSES for s, _, _ in rows.values()
            ):
                bad = {n: s for n, (s, _, _) in rows.items() if s != "done"}
                if bad:
                    raise RuntimeError(f"bench images not classified: {bad}; see {self.log_path}")
                return rows
            if not self.local.running():
                raise RuntimeError(f"the stack exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(names)} images not done in {timeout:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(poll)

    def wait_count(self, names: list[str], timeout: float, poll: float = 0.05) -> dict:
        """``wait_done`` for a burst: polls one indexed count (the stack's database holds only
        the bench's files), not K rows, so the bench's polling takes little from the cores it
        measures; then checks every row once."""
        from sqlalchemy import func, select

        from db.models import Image
        from db.session import session_scope

        deadline = time.monotonic() + timeout
        with session_scope(self.settings.db_url) as session:
            target = len(names) + session.scalar(select(func.count()).select_from(Image))
        while True:
            with session_scope(self.settings.db_url) as session:
                final = session.scalar(select(func.count()).select_from(Image).where(
                    Image.status.in_(FINAL_STATUSES)))
            if final >= target or not self.local.running() or time.monotonic() > deadline:
                return self.wait_done(names, timeout=max(1.0, deadline - time.monotonic()))
            time.sleep(poll)

    def batches(self) -> list[tuple[int, int, int]]:
        """(size, decode ms, forward ms) of every batch the worker logged so far."""
        text = self.log_path.read_text(errors="replace")
        return [(int(n), int(d), int(f)) for n, d, f in BATCH_LINE.findall(text)]

    def stop(self) -> None:
        self.local.stop(timeout=30)


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def measure_pipeline(stack: Stack, files: list[Path], progress: Progress) -> dict[str, Any]:
    """K files dropped into the inbox at once, until K rows are ``done``.

    They are staged on the inbox's filesystem first and renamed in, as an export that writes
    to a temporary name does: the clock measures the service, not the copying.
    """
    names = [p.name for p in files]
    staged = stack.settings.data_dir.absolute() / "staged"
    staged.mkdir(exist_ok=True)
    for path in files:
        shutil.copyfile(path, staged / path.name)
    before = len(stack.batches())
    started, wall = time.perf_counter(), time.time()
    for path in files:
        os.rename(staged / path.name, stack.settings.inbox_dir / path.name)
    copied = time.perf_counter() - started
    progress(f"  dropped {len(files)} files in {copied:.2f} s; waiting for the rows")
    rows = stack.wait_count(names, timeout=max(120.0, 10.0 * len(files)))
    # The last row's own finished_at, not the moment a poll saw it.
    elapsed = max(_timestamp(finished) for _, finished, _ in rows.values()) - wall
    first_row = min(_timestamp(received) for _, _, received in rows.values()) - wall
    batches = stack.batches()[before:]
    sizes = [n for n, _, _ in batches]
    forward_s = sum(f for _, _, f in batches) / 1000.0
    return {
        "images_per_s": len(files) / elapsed, "images": len(files), "seconds": elapsed,
        "copy_seconds": copied, "first_row_s": first_row, "batches": len(sizes),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "max_batch": max(sizes) if sizes else 0,
        "forward_s": forward_s, "decode_s": sum(d for _, d, _ in batches) / 1000.0,
        "forward_share": forward_s / elapsed,
    }


def measure_latency(stack: Stack, files: list[Path], gap_s: float,
                    progress: Progress) -> dict[str, Any]:
    """Files dropped one at a time ``gap_s`` apart: landing in the inbox -> ``done``."""
    landed: dict[str, float] = {}
    for i, path in enumerate(files, start=1):
        landed[path.name] = copy_into(stack.settings.inbox_dir, path)
        stack.wait_done([path.name], timeout=120.0, poll=0.05)
        if i % 5 == 0:
            progress(f"  latency: {i}/{len(files)}")
        time.sleep(gap_s)
    rows = stack.statuses(list(landed))
    total = [_timestamp(rows[n][1]) - t for n, t in landed.items()]
    intake = [_timestamp(rows[n][2]) - t for n, t in landed.items()]
    return {
        "p50_s": percentile(total, 50), "p95_s": percentile(total, 95),
        "intake_p50_s": percentile(intake, 50), "images": len(files), "gap_s": gap_s,
    }


# --- the whole run --------------------------------------------------------------------------


def measure_intake(root: Path, base: Settings, cfg: BenchConfig, files: list[Path],
                   progress: Progress) -> dict[str, Any]:
    """The watcher alone (``cxr watch``, its own data dir and queue, no worker): a burst of
    files renamed into the inbox at once, until every one is recorded and queued."""
    settings, env = _stack_settings(root / "intake", base, cfg)
    settings.ensure_dirs()
    from db.migrate import upgrade
    from db.session import session_scope
    from worker.ops.supervisor import CXR_COMMAND

    upgrade(settings.db_url)
    staged = settings.data_dir / "staged"
    staged.mkdir()
    for path in files:  # same filesystem as the inbox: the burst itself is renames
        shutil.copyfile(path, staged / path.name)
    log = open(root / "intake" / "watcher.log", "wb")  # noqa: SIM115
    watcher = subprocess.Popen([*CXR_COMMAND, "watch"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_log(root / "intake" / "watcher.log", "watching", watcher)
        started = time.perf_counter()
        for path in files:
            os.rename(staged / path.name, settings.inbox_dir / path.name)
        queued = 0
        while queued < len(files):
            if watcher.poll() is not None:
                raise RuntimeError(f"the watcher exited; see {root / 'intake' / 'watcher.log'}")
            time.sleep(0.05)
            with session_scope(settings.db_url) as session:
                queued = session.execute(sql_text(
                    "SELECT count(*) FROM images WHERE status = 'queued'")).scalar_one()
        elapsed = time.perf_counter() - started
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=30)
        log.close()
        _forget_queue(settings)
    rate = len(files) / elapsed
    progress(f"  intake: {len(files)} files recorded and queued in {elapsed:.2f} s "
             f"({rate:.0f} files/s)")
    return {"files_per_s": rate, "files": len(files), "seconds": elapsed}


def wait_for_log(path: Path, marker: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while marker not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{marker!r} never appeared; see {path}")
        time.sleep(0.05)


def _stack_settings(root: Path, base: Settings, cfg: BenchConfig) -> tuple[Settings, dict]:
    broker = with_db(base.broker_url, cfg.redis_db)
    queue = f"cxr-bench-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(root / "var"),
        "CXR_DATABASE_URL": f"sqlite:///{root / 'var' / 'cxr.db'}",
        "CXR_BROKER_URL": broker,
        "CXR_QUEUE": queue,
        "CXR_BATCH_SIZE": str(cfg.batch_size),
        "CXR_MESSAGE_SIZE": str(cfg.message_size),
        "CXR_STABLE_SECONDS": str(cfg.stable_seconds),
        "CXR_WORKER_CONCURRENCY": "1",
        "CXR_LOG_LEVEL": "INFO",
        "CXR_HEATMAPS": "true" if cfg.heatmaps else "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        **cfg.extra_env,
    }
    for name in ("CXR_INBOX", "CXR_MODELS_DIR"):
        env.pop(name, None)
    settings = Settings(data_dir=root / "var", database_url=env["CXR_DATABASE_URL"],
                        broker_url=broker, queue=queue)
    return settings, env


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (the bench never uses the service's own)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _forget_queue(settings: Settings) -> None:
    """Delete the private queue's keys (other queues on that Redis db are left alone)."""
    try:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=1)
        keys = client.keys(f"*{settings.queue}*")
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:
        pass


def run_bench(cfg: BenchConfig, base: Settings, progress: Progress = print) -> dict[str, Any]:
    """Run every measurement; returns the JSON-ready result."""
    import tempfile

    from db.migrate import upgrade
    from trainer.model.bundle import load_bundle

    machine = machine_info()
    progress(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU: "
             f"{', '.join(machine['gpus']) or 'none'}, TensorFlow {machine['tensorflow']}, "
             f"load average {machine['loadavg_start'][0]:.2f}")
    root = Path(cfg.work_dir or tempfile.mkdtemp(prefix="cxr-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    settings, env = _stack_settings(root, base, cfg)
    settings.ensure_dirs()
    upgrade(settings.db_url)
    progress(f"work dir {root}; building {cfg.backbone} at {cfg.img_size} px (random weights)")
    bundle = load_bundle(register_random_bundle(settings, cfg.backbone, cfg.img_size,
                                                threshold=0.0 if cfg.heatmaps else 0.5))
    progress(f"rendering synthetic X-rays ({cfg.source_px[0]}-{cfg.source_px[1]} px)")
    sources = make_sources(root / "sources", min(8, max(1, cfg.images)), cfg.source_px, cfg.seed)
    files = root / "files"
    warm = unique_files(sources, files, "warm", 3)
    batch = unique_files(sources, files, "load", cfg.images)
    spaced = unique_files(sources, files, "spaced", cfg.latency_images)
    notebook_files = batch[: max(1, min(cfg.notebook_images, len(batch)))]

    progress("ceiling: compiled forward pass on decoded tensors")
    ceiling = measure_ceiling(bundle, cfg.ceiling_batches, cfg.min_time_s, progress)
    heatmaps = None
    if cfg.backbone != FREE:  # the near-free model has no feature map to explain
        progress("heatmaps: Grad-CAM and its PNG on the same tensors")
        heatmaps = measure_heatmaps(bundle, ceiling["batch_size"], cfg.min_time_s, progress)
    progress(f"decode ceiling: trainer.imaging.decode on {min(len(batch), 200)} of the files")
    decode = measure_decode(batch[:200], cfg.img_size, cfg.min_time_s, progress)
    progress(f"notebook way: load_img + model.predict on {len(notebook_files)} files")
    notebook = measure_notebook(bundle.model, notebook_files, cfg.img_size, progress)

    progress("pipeline: starting the stack (cxr up: watcher + 1 worker)")
    stack = Stack(settings, env, root / "stack.log")
    try:
        for path in warm:
            copy_into(settings.inbox_dir, path)
        stack.wait_done([p.name for p in warm], timeout=300.0)
        progress(f"  stack warm; copying {len(batch)} files into the inbox")
        pipeline = measure_pipeline(stack, batch, progress)
        progress(f"  pipeline: {pipeline['images_per_s']:.1f} images/s "
                 f"(mean message {pipeline['mean_batch']:.1f} images; first row recorded "
                 f"{pipeline['first_row_s']:.2f} s after the drop)")
        progress(f"latency: {len(spaced)} files one at a time, {cfg.latency_gap_s} s apart")
        latency = measure_latency(stack, spaced, cfg.latency_gap_s, progress)
    finally:
        stack.stop()
        _forget_queue(settings)
    intake = None
    if cfg.burst:
        progress(f"intake: a burst of {cfg.burst} files into the watcher alone")
        intake = measure_intake(root, base, cfg, unique_files(sources, files, "burst", cfg.burst),
                                progress)
    progress("ceiling again, after the pipeline (the best of all rounds counts)")
    again = measure_ceiling(bundle, cfg.ceiling_batches, cfg.min_time_s, progress, rounds=1)
    ceiling = _best_ceiling(ceiling, again)
    machine["loadavg_end"] = list(os.getloadavg())
    config = asdict(cfg)
    config["work_dir"] = str(root)
    config.pop("extra_env")
    return {
        "machine": machine,
        "config": config,
        "ceiling": ceiling,
        "notebook": notebook,
        "pipeline": pipeline,
        "latency": latency,
        "decode": decode,
        "intake": intake,
        "heatmaps": heatmaps,
        "ratios": {
            "pipeline_over_ceiling": pipeline["images_per_s"] / ceiling["images_per_s"],
            "heatmaps_over_ceiling": heatmaps["images_per_s"] / ceiling["images_per_s"]
            if heatmaps else None,
            "pipeline_over_decode": pipeline["images_per_s"] / decode["images_per_s"],
            "pipeline_over_notebook": pipeline["images_per_s"] / notebook["images_per_s"],
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _best_ceiling(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    by_batch = {n: max(first["by_batch_size"][n], second["by_batch_size"][n])
                for n in first["by_batch_size"]}
    best = max(by_batch, key=by_batch.get)
    return {"images_per_s": by_batch[best], "batch_size": int(best), "by_batch_size": by_batch}


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: throughputs, latency and the two ratios."""
    c, nb, p, lat = (result[k] for k in ("ceiling", "notebook", "pipeline", "latency"))
    cfg, m = result["config"], result["machine"]
    d, h = result["decode"], result["heatmaps"]
    rows = [
        (f"ceiling (forward only, batch {c['batch_size']})", f"{c['images_per_s']:.1f}"),
        (f"decode ceiling ({d['threads']} threads)", f"{d['images_per_s']:.1f}"),
        ("notebook (load_img + predict, 1 by 1)", f"{nb['images_per_s']:.1f}"),
        ("pipeline (1 worker, heatmaps on)" if cfg.get("heatmaps")
         else "pipeline (inbox -> done, 1 worker)", f"{p['images_per_s']:.1f}"),
    ]
    if h:
        rows.insert(1, (f"heatmaps (Grad-CAM + PNG, batch {h['batch_size']})",
                        f"{h['images_per_s']:.1f}"))
    if result.get("intake"):
        rows.append((f"intake (watcher alone, {result['intake']['files']} files)",
                     f"{result['intake']['files_per_s']:.0f}"))
    lines = [
        f"cxr bench: {cfg['backbone']} at {cfg['img_size']} px, {cfg['images']} images, "
        f"worker batch {cfg['batch_size']}, message {cfg.get('message_size', cfg['batch_size'])}",
        f"machine: {m['cpu']} ({m['cores']} cores), GPU: {', '.join(m['gpus']) or 'none'}, "
        f"TensorFlow {m['tensorflow']}, load {m['loadavg_start'][0]:.2f} -> "
        f"{m.get('loadavg_end', [0])[0]:.2f}",
        "",
        f"{'measure':<40}{'images/s':>10}",
    ]
    lines += [f"{name:<40}{value:>10}" for name, value in rows]
    lines += [
        f"{'latency p50 / p95 (s, low load)':<40}{lat['p50_s']:>5.2f} / {lat['p95_s']:.2f}",
        f"{'pipeline / ceiling':<40}{result['ratios']['pipeline_over_ceiling']:>10.2f}",
        f"{'pipeline / decode ceiling':<40}{result['ratios']['pipeline_over_decode']:>10.2f}",
        f"{'pipeline / notebook':<40}{result['ratios']['pipeline_over_notebook']:>10.2f}",
        *([f"{'heatmaps / ceiling':<40}{result['ratios']['heatmaps_over_ceiling']:>10.2f}"]
          if h else []),
        f"(mean message {p['mean_batch']:.1f} images; forward pass {p['forward_share']:.0%} of "
        f"the pipeline's time; inbox -> received p50 {lat['intake_p50_s']:.2f} s)",
    ]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
