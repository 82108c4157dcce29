"""The Prometheus endpoint of a running `cxr up` (watcher, a prefork worker of two processes,
private Redis, SQLite, a tiny Keras model): what it counts equals what the database holds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections import Counter

import pytest
from helpers_models import register_tiny_bundle
from helpers_pipeline import ROOT, drop, free_port, png_bytes, wait_until
from sqlalchemy import text

from db.session import dispose_engines, session_scope
from worker.classify.metrics import REASON_KINDS
from worker.ops.supervisor import CXR_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _scrape(port: int) -> dict[str, list]:
    """metric sample name -> [(labels, value)] from the live endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _db(db_url: str, sql: str) -> list:
    with session_scope(db_url) as session:
        return session.execute(text(sql)).all()


@pytest.fixture
def up(tmp_path):
    data, port = tmp_path / "var", free_port()
    env = {**os.environ, "CXR_DATA_DIR": str(data), "CXR_STABLE_SECONDS": "0.3",
           "CXR_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "CXR_RESCAN_SECONDS": "1",
           "CXR_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
           "CXR_METRICS_PORT": str(port), "CXR_MESSAGE_SIZE": "2"}
    env.pop("CXR_DATABASE_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CXR_COMMAND, "up", "--no-flower", "--concurrency", "2"],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: "started worker" in log.read_text(), 90, "cxr up")
        yield data, port, f"sqlite:///{(data / 'cxr.db').absolute()}", log
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        dispose_engines()


def test_the_metrics_endpoint_counts_what_the_database_holds(up):
    data, port, db_url, log = up
    assert f"metrics on http://127.0.0.1:{port}/metrics" in log.read_text()
    levels = {"m-1.png": 250, "m-2.png": 10, "m-3.png": 240}
    first = png_bytes(250)
    for name, level in levels.items():
        drop(data / "inbox", name, first if level == 250 else png_bytes(level))
    wait_until(lambda: len(_db(db_url, "SELECT id FROM results WHERE status = "
                                       "'waiting_model'")) == 3, 60, "waiting_model")
    waiting = _scrape(port)
    queue = {labels["status"]: value for labels, value in waiting["cxr_queue_images"]}
    assert queue["waiting_model"] == 3 and waiting["cxr_oldest_queued_age_seconds"][0][1] > 0

    register_tiny_bundle(db_url, data / "models", "pneumonia")
    more = {f"n-{i}.png": 20 + 50 * i for i in range(5)}
    for name, level in more.items():
        drop(data / "inbox", name, png_bytes(level))
    (data / "inbox" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    wait_until(lambda: not _db(db_url, "SELECT id FROM results WHERE status NOT IN "
                                       "('done', 'rejected', 'failed')")
               and len(_db(db_url, "SELECT id FROM results")) == 9, 150, "every image final")

    # intake finishes these itself: a content already classified, and a link it refuses
    drop(data / "inbox", "twin.png", first)
    os.symlink("/etc/hostname", data / "inbox" / "link.png")
    wait_until(lambda: not _db(db_url, "SELECT id FROM results WHERE status NOT IN "
                                       "('done', 'rejected', 'failed')")
               and len(_db(db_url, "SELECT id FROM results")) == 11, 60, "intake's own")

    scraped = _scrape(port)
    counted = Counter()
    for labels, value in scraped["cxr_images_total"]:
        counted[(labels["status"], labels["label"], labels["model_version"])] += value
    in_db = Counter({(status, label or "", f"pneumonia/v{version}" if version else ""): n
                     for status, label, version, n in _db(db_url, (
                         "SELECT status, label, pneumonia_model, count(*) FROM results "
                         "GROUP BY status, label, pneumonia_model"))})
    assert +counted == in_db and in_db[("rejected", "", "")] == 2
    refusals = {labels["reason"]: value for labels, value in scraped["cxr_refusals_total"]}
    assert sum(refusals.values()) == 2 and refusals["link"] == 1
    assert set(refusals) <= {kind for kind, _ in REASON_KINDS} | {"other"}
    done = sum(n for (status, _, _), n in in_db.items() if status == "done")
    assert done == 9
    classified = done - 1  # the twin was linked at intake, never read by a worker
    assert scraped["cxr_drop_to_done_seconds_count"][0][1] == classified
    assert scraped["cxr_forward_seconds_count"][0][1] == classified
    assert scraped["cxr_decode_seconds_count"][0][1] == classified + 1
    assert sum(v for _, v in scraped["cxr_batch_images_sum"]) == classified + 1
    assert {labels["status"]: value for labels, value in scraped["cxr_queue_images"]} == {
        "received": 0, "queued": 0, "processing": 0, "waiting_model": 0}
    assert scraped["cxr_oldest_queued_age_seconds"][0][1] == 0


def test_a_restart_starts_from_an_empty_private_folder(tmp_path, monkeypatch):
    """An old run's multiprocess files would be added to the new run's counts."""
    from worker.ops.metrics_server import MULTIPROC_ENV, prepare_dir
    from worker.settings import Settings

    monkeypatch.setenv(MULTIPROC_ENV, "unset-by-the-test")  # restored afterwards
    settings = Settings(data_dir=tmp_path / "var")
    first = prepare_dir(settings, "up")
    (first / "counter_123.db").write_bytes(b"old run")
    again = prepare_dir(settings, "up")
    assert again == first and not any(again.iterdir())
    assert again.stat().st_mode & 0o777 == 0o700 and os.environ[MULTIPROC_ENV] == str(again)


def test_gate_refusals_and_review_flags_are_counted_by_kind():
    """A refusal by the input gate is its own kind (not 'view' or 'other'), and every review
    flag a batch gives is counted under its flag."""
    from worker.classify import metrics

    assert metrics.reason_kind("refused by the input gate (out_of_scope): unlike the chest "
                               "films this model knows (score 3.1, threshold 1.0)") == "input_gate"
    assert metrics.reason_kind("a lateral view (ViewPosition LL): send a frontal film") \
        == "not_a_chest_xray"

    def seen(flag: str) -> float:
        return metrics.REVIEW_FLAGS.labels(flag)._value.get()

    before = {f: seen(f) for f in ("uncertain:pneumonia", "out_of_scope")}
    metrics.observe_batch([("NORMAL", "pneumonia/v1")], ["refused by the input gate (text): x"],
                          0.01, 2, {}, [], ["uncertain:pneumonia", "out_of_scope"])
    assert seen("uncertain:pneumonia") == before["uncertain:pneumonia"] + 1
    assert seen("out_of_scope") == before["out_of_scope"] + 1
