"""Safe rollout on the real stack: a watcher and a `cxr worker` process, Redis, SQLite and
PostgreSQL, tiny real Keras bundles. Production and shadow versions classify the same images;
rows show production only; compare, the promotion guard, the audit trail, and a re-score that
is killed halfway (command and worker) and resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from helpers_models import register_tiny_bundle, tiny_probability
from helpers_pipeline import (
    POSTGRES_URL,
    ROOT,
    Pipeline,
    drop,
    pipeline_session,
    png_bytes,
    postgres_schema,
    stop_process,
    wait_until,
)
from sqlalchemy import text

from db.session import session_scope
from worker.ops.supervisor import CXR_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]
LEVELS = [40, 90, 115, 125, 135, 150, 190, 230]
"""Grey levels of the dropped images: the +3 bias of the candidate flips the middle ones."""
CANDIDATE_BIAS = 3.0


@pytest.fixture(params=BACKENDS)
def stack(request, tmp_path) -> Iterator[Pipeline]:
    with contextlib.ExitStack() as stack:
        db_url = None
        if request.param == "postgresql":
            _, db_url = stack.enter_context(postgres_schema())
        yield stack.enter_context(pipeline_session(
            tmp_path, db_url, start=False, env={"CXR_MESSAGE_SIZE": "1"}))


def start_cxr_worker(p: Pipeline) -> None:
    """`cxr worker` as users run it: its default queues are the live one and the re-score one."""
    log = open(p.root / "worker.log", "ab")  # noqa: SIM115
    p.worker = subprocess.Popen([*CXR_COMMAND, "worker", "--concurrency", "1"], env=p.env,
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    log.close()


def kill_worker(p: Pipeline) -> None:
    os.killpg(p.worker.pid, signal.SIGKILL)
    p.worker.wait()
    p.worker = None


def cxr(p: Pipeline, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CXR_COMMAND, *args], env=p.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def links(p: Pipeline) -> list[dict]:
    """Every (image, role, versions, label, p) the image_predictions table holds."""
    with session_scope(p.db_url) as session:
        return [dict(r) for r in session.execute(text(
            "SELECT ip.image_id, ip.role, m1.version AS v1, m2.version AS v2, p.label, "
            "p.p_pneumonia, p.p_virus FROM image_predictions ip "
            "JOIN predictions p ON p.id = ip.prediction_id "
            "JOIN model_versions m1 ON m1.id = p.pneumonia_model_id "
            "LEFT JOIN model_versions m2 ON m2.id = p.infection_model_id "
            "ORDER BY ip.id")).mappings()]


def audit_rows(p: Pipeline) -> list[dict]:
    with session_scope(p.db_url) as session:
        return [dict(r) for r in session.execute(text(
            "SELECT action, stage, version, actor, reason FROM audit ORDER BY id")).mappings()]


def test_shadow_compare_guard_rescore(stack: Pipeline, monkeypatch):
    p = stack
    for stage in ("pneumonia", "infection"):
        register_tiny_bundle(p.db_url, p.models_dir, stage)  # v1, production
        register_tiny_bundle(p.db_url, p.models_dir, stage, promote=False,
                             bias=CANDIDATE_BIAS if stage == "pneumonia" else -CANDIDATE_BIAS)
    cxr(p, "models", "shadow", "pneumonia", "2", "--by", "alice", "--reason", "trial")
    cxr(p, "models", "shadow", "infection", "2")
    listed = cxr(p, "models", "list").stdout
    assert listed.count("candidate, shadow") == 2, listed

    start_cxr_worker(p)
    p.start_watcher()
    names = [f"x{level}.png" for level in LEVELS]
    for name, level in zip(names, LEVELS, strict=True):
        drop(p.inbox, name, png_bytes(level))
    rows = p.wait_final(names, timeout=120)
    ids = {rows[n]["id"]: n for n in names}
    _check_shadows(p, rows, ids)
    report = _check_compare(p, rows, ids)
    _check_guard(p, report, monkeypatch)
    _check_rescore(p, rows, ids)


def _check_shadows(p: Pipeline, rows: dict, ids: dict) -> None:
    """Every image: one production prediction (what its row shows), a stage-1 shadow's, and a
    stage-2 shadow's exactly when production's stage 1 sent it to stage 2."""
    by_image: dict[int, list[dict]] = {}
    for link in links(p):
        by_image.setdefault(link["image_id"], []).append(link)
    for image_id, name in ids.items():
        row = rows[name]
        assert row["status"] == "done" and row["pneumonia_model"] == 1, row["error"]
        assert row["infection_model"] in (1, None)
        mine = by_image[image_id]
        production = [m for m in mine if m["role"] == "production"]
        assert len(production) == 1 and production[0]["v1"] == 1
        assert production[0]["label"] == row["label"]
        first = [m for m in mine if m["role"] == "shadow" and m["v1"] == 2]
        assert len(first) == 1 and first[0]["v2"] is None
        assert first[0]["p_pneumonia"] > row["p_pneumonia"]  # the +3 bias, same pixels
        second = [m for m in mine if m["role"] == "shadow" and m["v2"] == 2]
        if row["label"] == "NORMAL":
            assert second == []
        else:
            assert len(second) == 1 and second[0]["v1"] == 1
            assert second[0]["p_pneumonia"] == pytest.approx(row["p_pneumonia"])
            assert second[0]["p_virus"] < row["p_virus"]  # the -3 bias on stage 2
    labels = {r["label"] for r in rows.values()}
    assert labels <= {"NORMAL", "BACTERIA", "VIRUS"}  # never a shadow's stage-1-only answer


def _check_compare(p: Pipeline, rows: dict, ids: dict) -> dict:
    out = cxr(p, "models", "compare", "pneumonia", "2", "--format", "json",
              "--png", str(p.root / "compare.png"))
    report = json.loads(out.stdout)
    assert report["n"] == len(ids)
    expected_flips = sorted(
        i for i, n in ids.items() if rows[n]["label"] == "NORMAL"
        and tiny_probability(LEVELS[list(ids).index(i)], CANDIDATE_BIAS) >= 0.5)
    assert expected_flips, "the levels must make the candidate flip some images"
    assert sorted(f["image_id"] for f in report["flipped"]) == expected_flips
    assert report["table"][0][1] == len(expected_flips) and report["table"][1][0] == 0
    assert report["labelled"] is None  # no labels module on this branch: none yet
    assert (p.root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = json.loads(cxr(p, "models", "compare", "infection", "2", "--format", "json").stdout)
    sent_on = [i for i, n in ids.items() if rows[n]["label"] != "NORMAL"]
    assert second["n"] == len(sent_on) and second["classes"] == ["BACTERIA", "VIRUS"]
    assert second["table"][0][1] == 0  # the -3 bias only ever flips VIRUS to BACTERIA
    assert all(f["candidate_p"] < f["production_p"] for f in second["flipped"])
    text_out = cxr(p, "models", "compare", "pneumonia", "2").stdout
    assert f"{len(expected_flips)} image(s) would change label" in text_out
    return report


def _check_guard(p: Pipeline, report: dict, monkeypatch) -> None:
    """Through the CLI, with ground truth in the labels table (every flipped image truly
    NORMAL): the refusal, then --force, both in the audit trail."""
    from sqlalchemy import text

    from db import labels
    from db.session import session_scope
    from worker.cli import main

    flipped = {f["image_id"] for f in report["flipped"]}
    with session_scope(p.db_url) as session:
        for (image_id,) in session.execute(text("SELECT id FROM images")).all():
            labels.add_label(session, image_id, "NORMAL" if image_id in flipped else "VIRUS",
                             "import", "test")
    for key in ("CXR_DATA_DIR", "CXR_DATABASE_URL", "CXR_BROKER_URL", "CXR_QUEUE"):
        monkeypatch.setenv(key, p.env[key])
    assert main(["models", "promote", "pneumonia", "2", "--by", "bob"]) == 2
    assert main(["models", "promote", "pneumonia", "2", "--force", "--by", "bob",
                 "--reason", "reviewed by hand"]) == 0
    actions = [(a["action"], a["stage"], a["version"], a["actor"]) for a in audit_rows(p)]
    assert [a[:3] for a in actions] == [
        ("promote", "pneumonia", 1), ("promote", "infection", 1),  # published with --promote
        ("shadow on", "pneumonia", 2), ("shadow on", "infection", 2),
        ("promote", "pneumonia", 2)]  # once: the refusal changed nothing
    assert actions[2][3] == "alice" and actions[4][3] == "bob"
    history = cxr(p, "models", "history").stdout
    assert "forced=True" in history and "reviewed by hand" in history


def _check_rescore(p: Pipeline, rows: dict, ids: dict) -> None:
    """Kill `cxr rescore` once it has sent part of the work (no worker running), let a worker
    do that part, kill the worker, and run `cxr rescore` again: it resumes the same job."""
    stop_process(p.worker)
    p.worker = None
    first = subprocess.Popen([*CXR_COMMAND, "rescore", "--no-progress"], env=p.env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    job_cursor = "SELECT COALESCE(MAX(cursor), 0) FROM rescore_jobs"
    wait_until(lambda: p.count(job_cursor) > 0, 60, "the re-score to send its first messages")
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    shown_v2 = ("SELECT COUNT(*) FROM images i JOIN predictions p ON p.id = i.prediction_id "
                "JOIN model_versions m ON m.id = p.pneumonia_model_id WHERE m.version = 2")
    assert p.count(shown_v2) == 0
    start_cxr_worker(p)
    wait_until(lambda: p.count(shown_v2) >= 4, 90, "the first half to be re-scored")
    kill_worker(p)
    assert p.count(shown_v2) < len(ids)  # halfway: the window held the rest back
    start_cxr_worker(p)
    out = cxr(p, "rescore", "--no-progress", "--by", "carol")
    assert "resumed and finished" in out.stdout, out.stdout
    assert p.count(shown_v2) == len(ids)
    assert p.count("SELECT COUNT(*) FROM rescore_jobs") == 1
    assert p.count("SELECT COUNT(*) FROM rescore_jobs WHERE status = 'done'") == 1
    for image_id in ids:
        roles = [(m["role"], m["v1"]) for m in links(p) if m["image_id"] == image_id]
        assert ("production", 1) in roles and ("rescore", 2) in roles
    history = cxr(p, "results", "--history", str(next(iter(ids)))).stdout
    assert "production" in history and "rescore" in history and "shadow" in history
    actions = [a["action"] for a in audit_rows(p)]
    assert actions[-3:] == ["rescore", "rescore resumed", "rescore done"]
    again = cxr(p, "rescore", "--no-progress")  # nothing left: a new job with nothing to do
    assert "finished: 8 image(s)" in again.stdout
