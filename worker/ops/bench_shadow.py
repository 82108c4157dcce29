"""What a shadow version costs (`cxr bench --shadow`): the worker's own cascade code on the
same decoded tensors, production alone and production with a shadow of the same backbone
beside it. A same-backbone stage-1 shadow should cost one more forward pass, nothing more:
the pixels are decoded once and shared."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.classify.inference import Models, StageModel, classify_arrays
from worker.classify.shadow import run_shadows
from worker.ops.bench_ceilings import _rate

Progress = Callable[[str], None]


def add_shadow(settings, backbone: str, img_size: int):
    """Register a second random bundle of ``backbone`` and make it the pneumonia shadow, so the
    stack run classifies with it too; returns it loaded."""
    from db import registry
    from db.session import session_scope
    from trainer.model.bundle import load_bundle
    from worker.ops.bench_inputs import register_random_bundle

    path = register_random_bundle(settings, backbone, img_size, promote=False)
    with session_scope(settings.db_url) as session:
        candidate = max(registry.list_versions(session, "pneumonia"), key=lambda m: m.version)
        registry.set_shadow(session, "pneumonia", candidate.version)
    return load_bundle(path)


def measure_shadow(production, shadow, batch: int, min_time_s: float, progress: Progress
                   ) -> dict[str, Any]:
    """Images per second through ``classify_arrays`` alone and with ``run_shadows`` after it,
    ``batch`` images at a time; ``cost`` is the time with the shadow over the time without."""
    size = int(production.manifest.input_size)
    x = np.random.default_rng(2).integers(0, 256, (batch, size, size, 3)).astype(np.float32)
    prod, candidate = StageModel(1, 1, production), StageModel(2, 2, shadow)
    models = Models(prod, None, candidate, None)
    alone = _rate(lambda: len(classify_arrays(x, prod, None)), min_time_s)

    def both() -> int:
        answers = classify_arrays(x, prod, None)
        run_shadows(x, models, answers, None)
        return len(answers)

    with_shadow = _rate(both, min_time_s)
    progress(f"  shadow, batch {batch}: production alone {alone:.1f} images/s, with a shadow "
             f"{with_shadow:.1f} images/s ({alone / with_shadow:.2f}x the time)")
    return {"batch_size": batch, "production_images_per_s": alone,
            "with_shadow_images_per_s": with_shadow, "cost": alone / with_shadow}


def shadow_lines(shadow: dict[str, Any] | None) -> list[str]:
    """The bench table's lines about the shadow, if it was measured."""
    if not shadow:
        return []
    return [f"{'production + shadow (batch ' + str(shadow['batch_size']) + ')':<40}"
            f"{shadow['with_shadow_images_per_s']:>10.1f}",
            f"{'shadow cost (time with / without)':<40}{shadow['cost']:>10.2f}"]
