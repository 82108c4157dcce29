"""`cxr bench` end to end at a tiny size: the real stack, a dozen images, every field filled.

No wall-clock assertions: only that each measurement happened and produced positive numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from worker.ops.bench_inputs import _with_comment
from worker.ops.bench_service import percentile, with_db

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/12", socket_connect_timeout=1).ping()
    except Exception:
        pytest.skip("no Redis at 127.0.0.1:6379")


def test_helpers():
    assert with_db("redis://:pw@host:6380/0", 12) == "redis://:pw@host:6380/12"
    assert with_db("redis://localhost", 3) == "redis://localhost/3"
    jpeg = b"\xff\xd8\xff\xe0rest"
    tagged = _with_comment(jpeg, "a")
    assert tagged.startswith(b"\xff\xd8\xff\xfe\x00\x03a") and tagged.endswith(jpeg[2:])
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0 and percentile([], 95) == 0.0


def test_cxr_bench_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from worker.cli import main

    _redis_or_skip()
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CXR_TF_THREADS", "1")
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--backbone", "smallcnn", "--img-size", "32", "--images", "12",
        "--notebook-images", "4", "--latency-images", "3", "--latency-gap", "0.2",
        "--source-px", "64", "96", "--min-time", "0.2", "--batch-size", "8", "--heatmaps",
        "--shadow", "--baseline", "script", "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pipeline / ceiling" in printed and "pipeline / notebook" in printed
    assert "machine:" in printed
    assert "service / script" in printed and "decode ceiling" in printed
    result = json.loads(out.read_text())
    for section, keys in {
        "ceiling": ["images_per_s", "batch_size"],
        "notebook": ["images_per_s", "images", "seconds"],
        "pipeline": ["images_per_s", "images", "seconds", "batches", "mean_batch", "forward_s",
                     "forward_share"],
        "latency": ["p50_s", "p95_s", "intake_p50_s", "images"],
        "heatmaps": ["images_per_s", "gradcam_images_per_s", "batch_size"],
        "ratios": ["pipeline_over_ceiling", "pipeline_over_notebook", "heatmaps_over_ceiling",
                   "pipeline_over_script"],
        "script": ["images_per_s", "images", "batch_size"],
        "shadow": ["production_images_per_s", "with_shadow_images_per_s", "cost"],
        "gate": ["forward_images_per_s", "gated_images_per_s", "gate_images_per_s",
                 "batch_size", "colour_over_decode", "gate_over_forward"],
    }.items():
        for key in keys:
            assert result[section][key] > 0, (section, key, result[section])
    # the wall-clock windows `--perf` cuts its recording by: the script's passes before the
    # stack, the pipeline, the passes after it
    window, script = result["pipeline"]["window_unix"], result["script"]
    assert len(script["windows_unix"]) == len(script["rounds"]) == len(script["cores"]) == 6
    assert script["variants"] == ["as written", "autotuner off"] * 3
    assert all(0 < cores <= script["cpus"] + 0.5 for cores in script["cores"])
    for (start, end), rate in zip(script["windows_unix"], script["rounds"], strict=True):
        assert script["images"] / (end - start) == pytest.approx(rate, rel=0.1)
    assert script["windows_unix"][3][1] <= window[0] < window[1] <= script["windows_unix"][4][0]
    pipeline = result["pipeline"]  # the burst's intake, and the worker after it
    assert 0 < pipeline["intake_s"] <= pipeline["seconds"]
    assert 0 <= pipeline["done_during_intake"] <= 12
    assert pipeline["after_intake_images_per_s"] is None or pipeline[
        "after_intake_images_per_s"] > 0
    assert f"all 12 files recorded {pipeline['intake_s']:.2f} s after the drop" in printed
    cpu = pipeline["cpu_ms_per_image"]  # read from /proc, by cxr command: the worker worked
    assert cpu.get("worker", 0) > 0 and set(cpu) <= {"up", "watch", "worker"}, cpu
    assert "(CPU an image: the service" in printed
    processes = result["pipeline"]["processes"]  # who is who in a recording of the run
    assert set(processes) == {"supervisor", "watcher", "worker"}
    assert len(set(processes.values())) == 3 and os.getpid() not in processes.values()
    assert set(result["ceiling"]["by_batch_size"]) == {"1", "4", "8", "16", "32"}
    assert all(v > 0 for v in result["ceiling"]["by_batch_size"].values())
    assert result["pipeline"]["images"] == 12 and result["latency"]["images"] == 3
    assert result["latency"]["p95_s"] >= result["latency"]["p50_s"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["tensorflow"]
    assert result["config"]["backbone"] == "smallcnn"
    ratio = result["pipeline"]["images_per_s"] / result["ceiling"]["images_per_s"]
    assert result["ratios"]["pipeline_over_ceiling"] == pytest.approx(ratio)
    stack_log = (tmp_path / "work" / "stack.log").read_text()
    assert "batch of" in stack_log
    assert result["config"]["heatmaps"] and "heatmaps / ceiling" in printed
    assert "input gate / forward pass" in printed
    gate = result["gate"]
    assert gate["gate_over_forward"] == pytest.approx(
        gate["forward_images_per_s"] / gate["gate_images_per_s"])
    assert "heatmaps: " in stack_log  # every image positive: the worker drew its heatmap
    assert len(list((tmp_path / "work" / "var" / "heatmaps").rglob("*.png"))) == 12 + 3 + 3
    assert "shadow cost (time with / without)" in printed
    import sqlite3

    with sqlite3.connect(tmp_path / "work" / "var" / "cxr.db") as db:
        shadows = db.execute("SELECT COUNT(*) FROM image_predictions WHERE role = 'shadow'")
        assert shadows.fetchone()[0] == 12 + 3 + 3  # every image the stack classified


def test_the_free_model_is_near_free_and_its_table_has_no_heatmap_row():
    """The control-plane mode: pooling and one dense layer, nothing to explain."""
    import numpy as np

    from worker.ops.bench import format_table
    from worker.ops.bench_inputs import build_free_model

    model = build_free_model(32)
    assert not [layer for layer in model.layers if len(layer.output.shape) == 4
                and "conv" in layer.name]
    assert model.predict_on_batch(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 1)
    result = {
        "ceiling": {"batch_size": 16, "images_per_s": 4000.0},
        "notebook": {"images_per_s": 20.0},
        "pipeline": {"images_per_s": 150.0, "mean_batch": 16.0, "forward_share": 0.1},
        "latency": {"p50_s": 0.1, "p95_s": 0.2, "intake_p50_s": 0.05},
        "decode": {"threads": 2, "images_per_s": 200.0},
        "intake": {"files": 5000, "files_per_s": 1100.0},
        "heatmaps": None,
        "ratios": {"pipeline_over_ceiling": 0.04, "pipeline_over_decode": 0.75,
                   "pipeline_over_notebook": 7.5, "heatmaps_over_ceiling": None},
        "config": {"backbone": "free", "img_size": 224, "images": 1500, "batch_size": 16},
        "machine": {"cpu": "x", "cores": 2, "gpus": [], "tensorflow": "2", "loadavg_start": [0.1],
                    "loadavg_end": [0.2]},
    }
    table = format_table(result)
    assert "pipeline / decode ceiling" in table and "0.75" in table
    assert "intake (watcher alone, 5000 files)" in table and "heatmaps" not in table
    assert "files recorded" not in table  # a result from before the phases were kept
    result["pipeline"].update(images=1500, intake_s=1.42, done_during_intake=128,
                              after_intake_images_per_s=241.5)
    assert ("(all 1500 files recorded 1.42 s after the drop, the worker having finished 128; "
            "after that the worker ran at 241.5 images/s)") in format_table(result)


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_without_a_work_dir_removes_its_files(tmp_path, monkeypatch, fails):
    """A burst of 5,000 real-size files is gigabytes: a temporary work dir goes after a good
    run, and after a failed one all but the logs and databases its error points to; a named
    one is kept whole."""
    import tempfile

    import worker.ops.bench as bench
    from worker.ops.bench_inputs import BenchConfig
    from worker.settings import Settings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def run_in(root, cfg, base, progress):
        for name in ("files/load-0.jpg", "var/archive/ab/cd.jpg", "var/cxr.db", "stack.log",
                     "intake/watcher.log"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"x" * 10)
        seen.append(root)
        if fails:
            raise RuntimeError("the stack exited; see stack.log")
        return {"ok": True}

    monkeypatch.setattr(bench, "_run_in", run_in)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        assert bench.run_bench(BenchConfig(), Settings(), progress=lambda _: None) == {"ok": True}
    (root,) = seen
    assert root.parent == tmp_path
    if fails:
        left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert left == ["intake/watcher.log", "stack.log", "var/cxr.db"]
        assert not (root / "files").exists()
    else:
        assert not root.exists()
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        bench.run_bench(BenchConfig(work_dir=kept), Settings(), progress=lambda _: None)
    assert (kept / "files" / "load-0.jpg").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_process_trees_cpu_is_read_from_proc_and_named_by_program():
    """``LocalStack.cpu_seconds``' reading: the CPU of one process and its children only, a
    program that is not ``cxr`` by its name (a fork of ``cxr`` would take its parent's role)."""
    import subprocess
    import sys

    from worker.ops.stack import tree_cpu_seconds

    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print('burnt', flush=True)\ntime.sleep(60)")
    parent = ("import subprocess, sys\n"  # a parent that burns nothing, waiting on its child
              f"subprocess.run([sys.executable, '-c', {burn!r}])")
    child = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        used = tree_cpu_seconds(child.pid)
        comm = Path(f"/proc/{child.pid}/comm").read_text().strip()
    finally:
        for pid in [*_children(child.pid), child.pid]:
            os.kill(pid, 9)
        child.wait()
    assert set(used) == {comm}  # this test's own process is not in it
    assert 0.25 <= used[comm] < 5.0
    assert tree_cpu_seconds(2**22 + 1) == {}  # no such process


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found
