"""What the input gate costs beside the forward pass (``cxr bench``), on the bench's model.

The gated path (``worker.classify.gating``) replaces the forward pass by one giving features
as well, then runs the pixel checks and the learned score on them; the bench times both on
the same decoded tensors, at the ceiling's batch size, and reports the extra time as a share of
the forward pass (the aim: at most 5 %). The gate is fitted on synthetic films rendered at the
input size (its cost does not depend on how well it separates); the file-colour check is
timed apart, beside decoding, which is where it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from worker.ops.bench_ceilings import _rate
from worker.ops.bench_inputs import Progress

FIT_IMAGES = 96


def _films(size: int, n: int, seed: int = 0) -> np.ndarray:
    from trainer.synth.xrays import LABELS, render_xray

    rng = np.random.default_rng(seed)
    grey = [render_xray(rng, LABELS[i % 3], size, size) for i in range(n)]
    return np.stack([np.repeat(g[..., None], 3, axis=2) for g in grey])


def fitted_stage(bundle):
    """A StageModel of ``bundle`` with a gate fitted on rendered films (train and validation)."""
    from trainer.model.gate import fit_input_gate
    from trainer.model.gate_bundle import FeatureModel
    from worker.classify.inference import StageModel

    runner = FeatureModel(bundle)
    train, val = _films(bundle.manifest.input_size, FIT_IMAGES, 1), _films(
        bundle.manifest.input_size, FIT_IMAGES, 2)
    gate = fit_input_gate(runner.features(train), runner.features(val), train, val)
    return StageModel(0, 0, bundle, runner, gate)


def measure_gate(bundle, batch: int, min_time_s: float, progress: Progress,
                 files: list[Path] | None = None) -> dict[str, Any]:
    """Forward pass alone against forward pass + gate, same tensors; and the colour check
    against decoding on ``files``."""
    from worker.classify.gating import screen_batch

    stage = fitted_stage(bundle)
    x = _films(bundle.manifest.input_size, batch, 3)
    forward = _rate(lambda: len(bundle.predict_proba(x)), min_time_s)
    gated = _rate(lambda: len(screen_batch(stage, x)[0]), min_time_s)
    cost = forward / gated - 1.0
    result: dict[str, Any] = {"batch_size": batch, "forward_images_per_s": forward,
                              "gated_images_per_s": gated, "gate_over_forward": cost}
    if files:
        result.update(_colour_cost(files, bundle.manifest.input_size, min_time_s))
    progress(f"  gate, batch {batch}: forward {forward:.1f} images/s, with the gate "
             f"{gated:.1f} images/s: the gate costs {cost:+.1%} of the forward pass")
    return result


def _colour_cost(files: list[Path], size: int, min_time_s: float) -> dict[str, float]:
    from trainer.imaging.decode import decode_image
    from trainer.model.gate import check_file_colour

    decode = _rate(lambda: len([decode_image(f, size, 60_000_000) for f in files]), min_time_s)
    colour = _rate(lambda: len([check_file_colour(f) for f in files]), min_time_s)
    return {"colour_over_decode": decode / colour}
