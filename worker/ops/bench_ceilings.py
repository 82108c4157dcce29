"""``cxr bench``'s in-process measurements on the same model: the compiled forward pass on
decoded tensors (the ceiling), Grad-CAM and its PNG, the decode ceiling and the notebooks'
one-file-at-a-time loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainer.model.runtime import usable_cpus
from worker.ops.bench_inputs import Progress


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

    threads = usable_cpus()
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


def best_ceiling(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The ceiling over two runs of ``measure_ceiling``: the best rate of each batch size."""
    by_batch = {n: max(first["by_batch_size"][n], second["by_batch_size"][n])
                for n in first["by_batch_size"]}
    best = max(by_batch, key=by_batch.get)
    return {"images_per_s": by_batch[best], "batch_size": int(best), "by_batch_size": by_batch}
