"""``cxr bench``: how close the pipeline gets to the network's own speed, measured in one run.

Four measurements on the same machine, same model (random weights: speed does not depend on
them), so their ratios mean something even on a busy host:

* ceiling: the compiled forward pass (``LoadedBundle.predict_proba``) on tensors already
  decoded, at the best of a few batch sizes;
* notebook: what the notebooks do, ``load_img`` + ``model.predict`` one file at a time;
* pipeline: the real stack (``cxr up``: watcher + one worker, its own data dir, SQLite, a
  private queue) from K files copied into the inbox until K rows are ``done``;
* latency: files dropped one at a time, spaced out, from landing in the inbox to ``done``;
* gate: what the input gate (issue 22) adds beside the forward pass (``bench_gate``);
* heatmaps: what ``CXR_HEATMAPS`` adds per positive image, Grad-CAM and its PNG on the same
  decoded tensors as the ceiling (and, with ``heatmaps``, the pipeline run with them on and
  every image positive: the worst case);
* with ``perf``: where the CPU went in the pipeline's and the script's windows, by process and
  native library, from a whole-machine ``perf record`` (``bench_native``).

Files are synthetic X-rays at Kaggle-like sizes; each copy gets a unique JPEG comment so its
content hash differs (the service would otherwise link duplicates without inference).

Homes: ``bench_inputs`` (configuration, files, model), ``bench_ceilings`` (in-process
measurements), ``bench_service`` (the real stack, run by ``worker.ops.stack.LocalStack``);
this module runs them in order and formats the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.model.runtime import usable_cpus
from worker.ops.bench_ceilings import (
    best_ceiling,
    measure_ceiling,
    measure_decode,
    measure_heatmaps,
    measure_notebook,
)
from worker.ops.bench_gate import measure_gate
from worker.ops.bench_inputs import (
    FREE,
    BenchConfig,
    Progress,
    copy_into,
    make_sources,
    register_random_bundle,
    unique_files,
)
from worker.ops.bench_native import (
    NativeProfile,
    check_perf,
    native_budgets,
    native_lines,
    started_processes,
)
from worker.ops.bench_script import best_script, measure_script, script_cpu_ms, script_lines
from worker.ops.bench_service import (
    forget_queue,
    measure_intake,
    measure_latency,
    measure_pipeline,
    stack_settings,
    start_stack,
    wait_done,
)
from worker.settings import Settings


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
    cores = usable_cpus()
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


@dataclass
class BenchFiles:
    """The run's files, all distinct: a few to warm the stack, the load, the spaced drops."""

    sources: list[bytes]
    warm: list[Path]
    batch: list[Path]
    spaced: list[Path]
    notebook: list[Path]


def run_bench(cfg: BenchConfig, base: Settings, progress: Progress = print) -> dict[str, Any]:
    """Run every measurement; returns the JSON-ready result. Without ``cfg.work_dir`` the
    files (gigabytes with a large burst) go in a temporary folder, removed after a good run;
    after a failed one only its logs and database stay, for the error that names them."""
    import shutil
    import tempfile

    if cfg.perf:
        check_perf()  # before minutes of work, not after
    if cfg.work_dir is not None:
        Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
        return _run_in(Path(cfg.work_dir), cfg, base, progress)
    root = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        result = _run_in(root, cfg, base, progress)
    except BaseException:
        _keep_only_logs_and_databases(root)
        progress(f"kept the logs and databases in {root} for the error below")
        raise
    shutil.rmtree(root, ignore_errors=True)
    return result


def _keep_only_logs_and_databases(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()  # only once empty
        elif not (path.suffix == ".log" or path.name.startswith("cxr.db")):
            path.unlink(missing_ok=True)


def _run_in(root: Path, cfg: BenchConfig, base: Settings, progress: Progress
            ) -> dict[str, Any]:
    from db.migrate import upgrade
    from trainer.model.bundle import load_bundle

    machine = machine_info()
    progress(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU: "
             f"{', '.join(machine['gpus']) or 'none'}, TensorFlow {machine['tensorflow']}, "
             f"load average {machine['loadavg_start'][0]:.2f}")
    settings, env = stack_settings(root, base, cfg)
    settings.ensure_dirs()
    upgrade(settings.db_url)
    progress(f"work dir {root}; building {cfg.backbone} at {cfg.img_size} px (random weights)")
    bundle = load_bundle(register_random_bundle(settings, cfg.backbone, cfg.img_size,
                                                threshold=0.0 if cfg.heatmaps else 0.5))
    files = _bench_files(root, cfg, progress)
    profile = None
    if cfg.perf:
        progress(f"perf: recording every CPU into {root / 'perf.data'}")
        profile = NativeProfile(root / "perf.data")
    try:
        results = _measure_all(bundle, settings, env, root, base, cfg, files, progress)
    finally:
        if profile is not None:
            profile.stop()
    results["native"] = None
    if profile is not None:
        progress("perf: splitting the samples by process and library")
        results["native"] = native_budgets(profile, results, os.getpid())
    machine["loadavg_end"] = list(os.getloadavg())
    return _result(cfg, machine, results)


def _measure_all(bundle, settings: Settings, env: dict[str, str], root: Path, base: Settings,
                 cfg: BenchConfig, files: BenchFiles, progress: Progress) -> dict[str, Any]:
    """Every measurement, in order: in-process, the stack, the burst, then the ceiling and the
    script again (the best of all their rounds counts)."""
    results = _measure_in_process(bundle, cfg, files, progress)
    results["shadow"] = _measure_shadow(bundle, settings, cfg, progress) if cfg.shadow else None
    results.update(_measure_stack(settings, env, root, cfg, files, progress))
    results["intake"] = None
    if cfg.burst:
        progress(f"intake: a burst of {cfg.burst} files into the watcher alone")
        burst = unique_files(files.sources, root / "files", "burst", cfg.burst)
        results["intake"] = measure_intake(root, base, cfg, burst, progress)
    progress("ceiling again, after the pipeline (the best of all rounds counts)")
    again = measure_ceiling(bundle, cfg.ceiling_batches, cfg.min_time_s, progress, rounds=1)
    results["ceiling"] = best_ceiling(results["ceiling"], again)
    if cfg.baseline == "script":
        progress("script again, after the pipeline (the fastest pass counts)")
        results["script"] = best_script(results["script"], measure_script(
            bundle.model, files.batch, cfg.img_size, progress, rounds=1))
    return results


def _bench_files(root: Path, cfg: BenchConfig, progress: Progress) -> BenchFiles:
    progress(f"rendering synthetic X-rays ({cfg.source_px[0]}-{cfg.source_px[1]} px)")
    sources = make_sources(root / "sources", min(8, max(1, cfg.images)), cfg.source_px, cfg.seed)
    files = root / "files"
    warm = unique_files(sources, files, "warm", 3)
    batch = unique_files(sources, files, "load", cfg.images)
    spaced = unique_files(sources, files, "spaced", cfg.latency_images)
    notebook = batch[: max(1, min(cfg.notebook_images, len(batch)))]
    return BenchFiles(sources, warm, batch, spaced, notebook)


def _measure_in_process(bundle, cfg: BenchConfig, files: BenchFiles,
                        progress: Progress) -> dict[str, Any]:
    """ceiling, heatmaps, decode and notebook, in this process on the same model."""
    progress("ceiling: compiled forward pass on decoded tensors")
    ceiling = measure_ceiling(bundle, cfg.ceiling_batches, cfg.min_time_s, progress)
    heatmaps = None
    if cfg.backbone != FREE:  # the near-free model has no feature map to explain
        progress("heatmaps: Grad-CAM and its PNG on the same tensors")
        heatmaps = measure_heatmaps(bundle, ceiling["batch_size"], cfg.min_time_s, progress)
    progress("gate: the input gate beside the forward pass, same tensors")
    gate = measure_gate(bundle, ceiling["batch_size"], cfg.min_time_s, progress,
                        files.batch[:50])
    progress(f"decode ceiling: trainer.imaging.decode on {min(len(files.batch), 200)} of the "
             "files")
    decode = measure_decode(files.batch[:200], cfg.img_size, cfg.min_time_s, progress)
    script = None
    if cfg.baseline == "script":
        progress(f"script: the user's tf.data script on the same {len(files.batch)} files")
        script = measure_script(bundle.model, files.batch, cfg.img_size, progress)
    progress(f"notebook way: load_img + model.predict on {len(files.notebook)} files")
    notebook = measure_notebook(bundle.model, files.notebook, cfg.img_size, progress)
    return {"ceiling": ceiling, "heatmaps": heatmaps, "decode": decode, "notebook": notebook,
            "gate": gate, "script": script}


def _measure_shadow(bundle, settings: Settings, cfg: BenchConfig, progress: Progress
                    ) -> dict[str, Any]:
    """A second bundle of the same backbone as the shadow: its cost on tensors, and the stack
    run then classifies with it too."""
    from worker.ops.bench_shadow import add_shadow, measure_shadow

    progress("shadow: a second random bundle beside production, on the same tensors")
    shadow = add_shadow(settings, cfg.backbone, cfg.img_size)
    return measure_shadow(bundle, shadow, cfg.batch_size, cfg.min_time_s, progress)


def _measure_stack(settings: Settings, env: dict[str, str], root: Path, cfg: BenchConfig,
                   files: BenchFiles, progress: Progress) -> dict[str, Any]:
    """pipeline and latency through the real stack, started warm and stopped afterwards."""
    progress("pipeline: starting the stack (cxr up: watcher + 1 worker)")
    log = root / "stack.log"
    earlier = len(log.read_text(errors="replace")) if log.exists() else 0  # a reused work dir
    stack = start_stack(env, log)
    try:
        for path in files.warm:
            copy_into(settings.inbox_dir, path)
        wait_done(stack, settings.db_url, [p.name for p in files.warm], timeout=300.0)
        progress(f"  stack warm; copying {len(files.batch)} files into the inbox")
        pipeline = measure_pipeline(stack, settings, files.batch, progress)
        pipeline["processes"] = {"supervisor": stack.pid,
                                 **started_processes(stack.log_text()[earlier:])}
        progress(f"  pipeline: {pipeline['images_per_s']:.1f} images/s "
                 f"(mean message {pipeline['mean_batch']:.1f} images; first row recorded "
                 f"{pipeline['first_row_s']:.2f} s after the drop)")
        progress(f"latency: {len(files.spaced)} files one at a time, {cfg.latency_gap_s} s apart")
        latency = measure_latency(stack, settings, files.spaced, cfg.latency_gap_s, progress)
    finally:
        stack.stop(timeout=30)
        forget_queue(settings)
    return {"pipeline": pipeline, "latency": latency}


def _result(cfg: BenchConfig, machine: dict[str, Any], results: dict[str, Any]
            ) -> dict[str, Any]:
    """The JSON-ready result: every measurement, the run's configuration and the ratios."""
    config = asdict(cfg)
    config["work_dir"] = str(cfg.work_dir) if cfg.work_dir is not None else None
    config.pop("extra_env")
    pipeline, ceiling, heatmaps = results["pipeline"], results["ceiling"], results["heatmaps"]
    return {
        "machine": machine,
        "config": config,
        **{key: results[key] for key in ("ceiling", "notebook", "pipeline", "latency", "decode",
                                         "intake", "heatmaps", "shadow", "gate", "script",
                                         "native")},
        "ratios": {
            "pipeline_over_ceiling": pipeline["images_per_s"] / ceiling["images_per_s"],
            "heatmaps_over_ceiling": heatmaps["images_per_s"] / ceiling["images_per_s"]
            if heatmaps else None,
            "pipeline_over_decode": pipeline["images_per_s"] / results["decode"]["images_per_s"],
            "pipeline_over_notebook": pipeline["images_per_s"]
            / results["notebook"]["images_per_s"],
            "gate_over_forward": results["gate"]["gate_over_forward"],
            "pipeline_over_script": pipeline["images_per_s"] / results["script"]["images_per_s"]
            if results.get("script") else None,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _phase_lines(p: dict[str, Any]) -> list[str]:
    """Where the pipeline's time went: the burst's intake, then the worker alone."""
    if p.get("intake_s") is None:  # a result written before the phases were kept
        return []
    after = p.get("after_intake_images_per_s")
    return [f"(all {p['images']} files recorded {p['intake_s']:.2f} s after the drop, the "
            f"worker having finished {p['done_during_intake']}; "
            + (f"after that the worker ran at {after:.1f} images/s)" if after else
               "nothing was left after that)")]


def _cpu_lines(result: dict[str, Any]) -> list[str]:
    """The pipeline's CPU an image by command, beside the script's: what each did, idle cores
    left out (a result without them prints nothing)."""
    cpu = result["pipeline"].get("cpu_ms_per_image")
    if not cpu:
        return []
    names = {"watch": "watcher", "up": "cxr up"}
    parts = ", ".join(f"{names.get(role, role)} {ms:.2f}"
                      for role, ms in sorted(cpu.items(), key=lambda x: -x[1]))
    line = f"(CPU an image: the service {sum(cpu.values()):.2f} ms ({parts})"
    script = script_cpu_ms(result.get("script"))
    if script:
        line += (f"; the script's fastest pass {script:.2f} ms, "
                 f"{script / sum(cpu.values()):.2f} of the service's")
    return [line + ")"]


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: throughputs, latency and the two ratios."""
    from worker.ops.bench_shadow import shadow_lines

    c, nb, p, lat = (result[k] for k in ("ceiling", "notebook", "pipeline", "latency"))
    cfg, m = result["config"], result["machine"]
    d, h = result["decode"], result["heatmaps"]
    rows = [
        (f"ceiling (forward only, batch {c['batch_size']})", f"{c['images_per_s']:.1f}"),
        (f"decode ceiling ({d['threads']} threads)", f"{d['images_per_s']:.1f}"),
        ("notebook (load_img + predict, 1 by 1)", f"{nb['images_per_s']:.1f}"),
        ("pipeline (1 worker, heatmaps on)" if cfg.get("heatmaps")
         else "pipeline (1 worker, with a shadow)" if cfg.get("shadow")
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
        *script_lines(result),
        f"{'pipeline / notebook':<40}{result['ratios']['pipeline_over_notebook']:>10.2f}",
        *([f"{'heatmaps / ceiling':<40}{result['ratios']['heatmaps_over_ceiling']:>10.2f}"]
          if h else []),
        *shadow_lines(result.get("shadow")),
        *([f"{'input gate / forward pass (aim <= 5 %)':<40}"
           f"{result['gate']['gate_over_forward']:>10.1%}"] if result.get("gate") else []),
        f"(mean message {p['mean_batch']:.1f} images; forward pass {p['forward_share']:.0%} of "
        f"the pipeline's time; inbox -> received p50 {lat['intake_p50_s']:.2f} s)",
        *_phase_lines(p),
        *_cpu_lines(result),
        *native_lines(result),
    ]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
