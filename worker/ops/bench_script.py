"""``cxr bench --baseline script``: the twenty lines of tf.data a user would write instead of
running the service (issue 28), on the same files, the same model, the same machine, in the
same run, so ``service / script`` says what the durable path costs.

This is the user's script, not the serving path: it may use ``tf.*`` (TensorFlow is the
training backend and is installed wherever the bench runs). It does what the issue describes,
nothing more: list the files, read and ``tf.io.decode_jpeg`` them in parallel
(``num_parallel_calls=AUTOTUNE``), resize to the model's input size, batch 32 and
``model.predict_on_batch``. No hashing, no database, no gate: that is the point of comparison.

Each round runs it twice: as written, and with tf.data's autotuner off. On two cores the
autotuner often pins a whole pass near 195 images/s (on an Intel and an AMD machine alike, pass
after pass, whatever the files' speed); with it off, ``AUTOTUNE`` parallelism takes a fixed
default and none of 14 passes settled there. A user who saw their script crawl would turn it off,
so the faster of the two is the script's rate, which only ever makes the baseline harder for
the service.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainer.model.runtime import usable_cpus
from worker.ops.bench_inputs import Progress

SCRIPT_BATCH = 32
AS_WRITTEN, AUTOTUNE_OFF = "as written", "autotuner off"
VARIANTS = (AS_WRITTEN, AUTOTUNE_OFF)
"""The script's two forms, run in turn in every round."""


def user_script(model, files: list[Path], size: int, autotune: bool = True) -> int:
    """The user's script, as they would write it (``autotune=False``: with tf.data's autotuner
    switched off, one option more); returns how many images it classified."""
    import tensorflow as tf

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, (size, size))

    dataset = (tf.data.Dataset.from_tensor_slices([str(f) for f in files])
               .map(load, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(SCRIPT_BATCH)
               .prefetch(tf.data.AUTOTUNE))
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = dataset.with_options(options)
    done = 0
    for batch in dataset:
        probabilities = model.predict_on_batch(batch)
        done += len(probabilities)
    return done


SCRIPT_ROUNDS = 2
"""Rounds before the stack runs (one more after it), each the script as written and then with
the autotuner off: the fastest of all passes is the script's rate, so a busy moment on a shared
host counts for the script, never for the service it is compared against."""


def measure_script(model, files: list[Path], size: int, progress: Progress,
                   rounds: int = SCRIPT_ROUNDS) -> dict[str, Any]:
    """The script's throughput on ``files``: warmed on a few first (tracing), then ``rounds``
    rounds of both forms; every pass is kept with its form, wall-clock window and the cores it
    kept busy."""
    user_script(model, files[: min(len(files), 2 * SCRIPT_BATCH)], size)
    rates, windows, cores, variants = [], [], [], []
    for r in range(rounds):
        for variant in VARIANTS:
            started, wall, cpu = time.perf_counter(), time.time(), time.process_time()
            done = user_script(model, files, size, autotune=variant == AS_WRITTEN)
            seconds = time.perf_counter() - started
            rates.append(done / seconds)
            windows.append([wall, time.time()])
            cores.append((time.process_time() - cpu) / seconds)  # tf.data's threads are ours
            variants.append(variant)
            progress(f"  script round {r + 1}, {variant}: {rates[-1]:.1f} images/s ({done} "
                     f"files, batch {SCRIPT_BATCH}, {cores[-1]:.1f} cores busy)")
    return {"images_per_s": max(rates), "rounds": rates, "variants": variants,
            "windows_unix": windows, "cores": cores, "cpus": usable_cpus(),
            "images": len(files), "batch_size": SCRIPT_BATCH}


def best_script(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """The script over two measurements: the faster one counts, every pass is kept."""
    if first is None:
        return second
    best = second if second["images_per_s"] > first["images_per_s"] else first
    return {**best, **{key: [*first.get(key, []), *second.get(key, [])]
                       for key in ("rounds", "variants", "windows_unix", "cores")}}


def fastest_pass(script: dict[str, Any]) -> int:
    """Index of the pass whose rate counts (``service / script``, ``--perf``'s window)."""
    rounds = script["rounds"]
    return max(range(len(rounds)), key=rounds.__getitem__)


def script_cpu_ms(script: dict[str, Any] | None) -> float | None:
    """ms of CPU an image of the fastest pass (tf.data's threads run in the bench's process,
    so its CPU time is theirs); None without the cores a pass kept busy."""
    if not script or not script.get("cores"):
        return None
    i = fastest_pass(script)
    return script["cores"][i] / script["rounds"][i] * 1000.0


def script_lines(result: dict[str, Any]) -> list[str]:
    """The table's lines for the script baseline (none when it was not run): the fastest pass,
    which form it was, and the best of each form, so a slow autotuner shows."""
    script = result.get("script")
    if not script:
        return []
    ratio = result["ratios"]["pipeline_over_script"]
    lines = [
        f"{'script (tf.data, batch 32, same model)':<40}{script['images_per_s']:>10.1f}",
        f"{'service / script':<40}{ratio:>10.2f}",
    ]
    variants = script.get("variants")
    if variants and len(variants) == len(script["rounds"]):
        best = {v: max(r for r, w in zip(script["rounds"], variants, strict=True) if w == v)
                for v in dict.fromkeys(variants)}
        lines.append("(the script's fastest pass: " + variants[fastest_pass(script)] + "; best "
                     + ", ".join(f"{v} {rate:.1f}" for v, rate in best.items())
                     + " images/s)")
    return lines
