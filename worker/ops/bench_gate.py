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


def _best(run, min_time_s: float, rounds: int) -> float:
    return max(_rate(run, min_time_s) for _ in range(rounds))


def measure_gate(bundle, batch: int, min_time_s: float, progress: Progress,
                 files: list[Path] | None = None, rounds: int = 3) -> dict[str, Any]:
    """The gate's own work (pixel checks, layout and feature scores, on features already
    computed) against the forward pass, and the whole gated pass against the plain one, same
    tensors, best of ``rounds`` each, taken in turn (a busy host hits one round, not one side);
    and the colour check against decoding on ``files``."""
    from trainer.model.gate import check_pixels
    from worker.classify.gating import learned_verdicts, screen_batch

    stage = fitted_stage(bundle)
    x = _films(bundle.manifest.input_size, batch, 3)
    features, _ = stage.runner.predict(x)

    def gate_only() -> int:
        [check_pixels(px) for px in x]
        return len(learned_verdicts(stage.gate, features, x)[0])

    best = {"forward": 0.0, "gated": 0.0, "gate": 0.0}
    for _ in range(rounds):
        best["forward"] = max(best["forward"], _rate(lambda: len(bundle.predict_proba(x)),
                                                     min_time_s))
        best["gated"] = max(best["gated"], _rate(lambda: len(screen_batch(stage, x)[0]),
                                                 min_time_s))
        best["gate"] = max(best["gate"], _rate(gate_only, min_time_s))
    cost = best["forward"] / best["gate"]
    result: dict[str, Any] = {
        "batch_size": batch, "forward_images_per_s": best["forward"],
        "gated_images_per_s": best["gated"], "gate_images_per_s": best["gate"],
        "gate_over_forward": cost, "gated_over_forward": best["forward"] / best["gated"] - 1}
    if files:
        result.update(_colour_cost(files, bundle.manifest.input_size, min_time_s))
    progress(f"  gate, batch {batch}: forward {best['forward']:.1f} images/s, the gate's own "
             f"work {best['gate']:.1f} images/s: {cost:.1%} of the forward pass (whole gated "
             f"pass {result['gated_over_forward']:+.1%}, a noisier difference)")
    return result


def _colour_cost(files: list[Path], size: int, min_time_s: float) -> dict[str, float]:
    from trainer.imaging.decode import decode_image
    from trainer.model.gate import check_file_colour

    decode = _rate(lambda: len([decode_image(f, size, 60_000_000) for f in files]), min_time_s)
    colour = _rate(lambda: len([check_file_colour(f) for f in files]), min_time_s)
    return {"colour_over_decode": decode / colour}
