"""`cxr monitor` on a real stack (watcher, Celery worker, Redis, SQLite and PostgreSQL, tiny
Keras models): labels imported for a run give the per-version figures computed here from the
images' brightness; a run like the validation data stays quiet and a much brighter one raises
the drift alarm (`--check` exits 1).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import subprocess

import numpy as np
import pytest
from helpers_models import register_tiny_bundle, tiny_probability
from helpers_pipeline import POSTGRES_URL, ROOT, drop, pipeline_session, png_bytes, postgres_schema

from worker.ops.supervisor import CXR_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]
LEVELS = [10 + 6 * i for i in range(40)]
"""Grey levels of the unshifted run (and of the 'validation' reference): 10 to 244."""
BRIGHT = [200 + i for i in range(0, 50, 2)]
"""The shifted run: 25 images much brighter than anything in validation."""


def _truth(i: int, level: int) -> str:
    """The test's ground truth: mostly what brightness says, with misses and false alarms."""
    if level < 128:
        return "BACTERIA" if i % 5 == 0 else "NORMAL"  # 4 of 20 missed pneumonias
    return "NORMAL" if i % 7 == 0 else ("VIRUS" if i % 2 else "BACTERIA")


def _wilson(k: int, n: int) -> list[float]:
    z = 1.959963984540054
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def _auc(pos: list[float], neg: list[float]) -> float:
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]))


def _expected(truths: list[str]) -> dict[str, float]:
    """Stage-1 and cascade figures from the levels and the tiny model's formula alone."""
    p = [tiny_probability(level) for level in LEVELS]
    sick = [t != "NORMAL" for t in truths]
    said = [q >= 0.5 for q in p]
    tp = sum(s and d for s, d in zip(sick, said, strict=True))
    tn = sum(not s and not d for s, d in zip(sick, said, strict=True))
    cascade = ["VIRUS" if d else "NORMAL" for d in said]  # bright -> VIRUS at stage 2 too
    return {"sensitivity": tp / sum(sick), "specificity": tn / (len(sick) - sum(sick)),
            "accuracy": (tp + tn) / len(sick), "tp": tp, "n_sick": sum(sick),
            "auc": _auc([q for q, s in zip(p, sick, strict=True) if s],
                        [q for q, s in zip(p, sick, strict=True) if not s]),
            "cascade_accuracy": float(np.mean([c == t for c, t in zip(cascade, truths,
                                                                      strict=True)]))}


def _monitor(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CXR_COMMAND, "monitor", *args], env=pipeline.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(params=BACKENDS)
def stack(request, tmp_path):
    with contextlib.ExitStack() as stack:
        db_url = None
        if request.param == "postgresql":
            db_url = stack.enter_context(postgres_schema())[1]
        yield stack.enter_context(pipeline_session(tmp_path, db_url))


def test_labelled_figures_and_the_drift_alarm(stack, tmp_path):
    reference = {"reference": {"source": "validation", "edges": [i / 10 for i in range(11)],
                               "counts": np.histogram([tiny_probability(v) for v in LEVELS],
                                                      bins=np.linspace(0, 1, 11))[0].tolist()}}
    register_tiny_bundle(stack.db_url, stack.models_dir, "pneumonia", metrics=reference)
    register_tiny_bundle(stack.db_url, stack.models_dir, "infection")
    names = [f"calm-{i:02d}.png" for i in range(len(LEVELS))]
    for name, level in zip(names, LEVELS, strict=True):
        drop(stack.inbox, name, png_bytes(level))
    rows = stack.wait_final(names, timeout=180)
    truths = [_truth(i, level) for i, level in enumerate(LEVELS)]
    with open(tmp_path / "truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sha256", "label"])
        writer.writerows([rows[n]["sha256"], t] for n, t in zip(names, truths, strict=True))
    out = subprocess.run([*CXR_COMMAND, "labels", "import", str(tmp_path / "truth.csv"),
                          "--by", "test"], env=stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "40 of 40 line(s) matched" in out.stdout, out.stdout + out.stderr

    quiet = _monitor(stack, "--check", "--format", "json")
    assert quiet.returncode == 0, quiet.stdout[-3000:] + quiet.stderr
    report = json.loads(quiet.stdout)
    assert report["drifted"] is False and report["drift"]["alarms"] == []
    figures = {v["model"]: v for v in report["versions"]}
    stage_one, want = figures["pneumonia/v1"], _expected(truths)
    assert stage_one["n_labelled"] == 40
    for key in ("sensitivity", "specificity", "accuracy", "auc", "cascade_accuracy"):
        assert stage_one[key] == pytest.approx(want[key]), key
    assert stage_one["sensitivity_ci"] == pytest.approx(_wilson(want["tp"], want["n_sick"]))
    assert stage_one["auc_ci"][0] < want["auc"] < stage_one["auc_ci"][1]
    assert [w["week"] for w in stage_one["weeks"]] and stage_one["weeks"][0]["n_labelled"] == 40
    assert stage_one["review_share"] == 0.0  # these bundles have no band: nothing flagged
    stage_two = figures["infection/v1"]
    two = [t for t, level in zip(truths, LEVELS, strict=True) if level > 128 and t != "NORMAL"]
    assert stage_two["n_infection_labelled"] == len(two)
    assert stage_two["accuracy"] == pytest.approx(two.count("VIRUS") / len(two))
    day = report["drift"]["days"][-1]
    calm = {s["model"]: s for s in day["stages"]}
    assert calm["pneumonia/v1"]["reference"] == "validation" and calm["pneumonia/v1"]["psi"] < 0.05
    assert calm["infection/v1"]["reference"] == "first week served"

    register_tiny_bundle(stack.db_url, stack.models_dir, "pneumonia", metrics=reference)
    bright = [f"bright-{i:02d}.png" for i in range(len(BRIGHT))]
    for name, level in zip(bright, BRIGHT, strict=True):
        drop(stack.inbox, name, png_bytes(level))
    stack.wait_final(bright, timeout=180)
    alarm = _monitor(stack, "--check", "--plot", str(tmp_path / "plots"))
    assert alarm.returncode == 1, alarm.stdout[-3000:] + alarm.stderr
    assert "DRIFT:" in alarm.stdout and "pneumonia/v2 probabilities PSI" in alarm.stdout
    assert "pneumonia/v1 probabilities" not in alarm.stdout.split("DRIFT:", 1)[1]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "pneumonia-v1-weekly.png", "psi-per-day.png"}
