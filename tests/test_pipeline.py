"""End to end with real parts: watcher and ``celery -A worker worker`` processes, Redis on
127.0.0.1:6379 (a private db number and queue, flushed), SQLite and PostgreSQL, tiny real
Keras bundles. One worker per backend serves every scenario below, so a promotion is seen
by an already-running worker.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers_models import register_tiny_bundle
from helpers_pipeline import (
    POSTGRES_URL,
    ROOT,
    SHARED_REDIS,
    Pipeline,
    drop,
    png_bytes,
    postgres_schema,
    shared_redis,
)
from sqlalchemy import update

from db.models import Image, ModelVersion
from db.session import dispose_engines, session_scope
from db.vocabulary import ImageStatus, Label, ModelStatus
from worker.ops.supervisor import CXR_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(scope="module", params=BACKENDS)
def pipeline(request, tmp_path_factory) -> Iterator[Pipeline]:
    """One worker per backend for the whole module; each test starts the watcher it needs."""
    db_number = random.randint(4, 15)
    redis_client = shared_redis(db_number)
    redis_client.flushdb()
    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{root / 'cxr.db'}"
        else:
            _, db_url = stack.enter_context(postgres_schema())
        from db.migrate import upgrade

        upgrade(db_url)
        env = {
            **os.environ,
            "CXR_DATA_DIR": str(root / "var"),
            "CXR_DATABASE_URL": db_url,
            "CXR_BROKER_URL": f"redis://{SHARED_REDIS}/{db_number}",
            "CXR_QUEUE": f"cxr-test-{uuid.uuid4().hex[:8]}",
            "CXR_STABLE_SECONDS": "0.5",
            "CXR_RESCAN_SECONDS": "1",
            "CXR_VISIBILITY_TIMEOUT": "60",
            "CXR_TF_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }
        p = Pipeline(root, env, db_url, redis=None)
        p.inbox.mkdir(parents=True)
        p.start_worker()
        try:
            yield p
        finally:
            p.stop_watcher()
            p.stop_worker()
            redis_client.flushdb()
            redis_client.close()
            dispose_engines()


def _set_production(db_url: str, stage: str, version: int | None) -> None:
    """Test setup: make ``version`` the only production row of ``stage`` (None: no model)."""
    with session_scope(db_url) as session:
        session.execute(update(ModelVersion).where(ModelVersion.stage == stage,
                                                   ModelVersion.status == ModelStatus.PRODUCTION)
                        .values(status=ModelStatus.ARCHIVED))
    if version is not None:
        from db import registry

        with session_scope(db_url) as session:
            registry.promote(session, stage, version)


def test_no_model_waits_then_promote_classifies(pipeline):
    pipeline.start_watcher()
    names = ["wait-1.png", "wait-2.png"]
    for name in names:
        drop(pipeline.inbox, name, png_bytes(250))
    pipeline.wait_status(names, {"waiting_model"})
    version = register_tiny_bundle(pipeline.db_url, pipeline.models_dir, "pneumonia",
                                   promote=False)
    out = subprocess.run(
        [*CXR_COMMAND, "models", "promote", "pneumonia", str(version)],
        env=pipeline.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = pipeline.wait_final(names)
    assert [rows[n]["label"] for n in names] == ["PNEUMONIA", "PNEUMONIA"]
    assert {rows[n]["pneumonia_model"] for n in names} == {version}


def test_drop_many_with_slow_copy_duplicate_and_corrupt_file(pipeline):
    if pipeline.watcher is None:
        pipeline.start_watcher()
    inbox = pipeline.inbox
    levels = {"bright-a.png": 245, "dark-b.png": 10, "bright-c.png": 230, "dark-d.png": 20}
    for name, level in levels.items():
        drop(inbox, name, png_bytes(level))
    twin = png_bytes(240)
    drop(inbox, "twin-1.png", twin)
    drop(inbox, "twin-2.png", twin)
    (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    slow_data = png_bytes(15)
    with open(inbox / "slow.png", "wb") as fh:  # one open file, chunks 0.2 s apart
        for i in range(0, len(slow_data), max(1, len(slow_data) // 4)):
            fh.write(slow_data[i:i + max(1, len(slow_data) // 4)])
            fh.flush()
            time.sleep(0.2)
    names = [*levels, "twin-1.png", "twin-2.png", "corrupt.png", "slow.png"]
    rows = pipeline.wait_final(names)
    assert len([n for n in pipeline.rows() if n in names]) == len(names)
    expected = {"bright-a.png": "PNEUMONIA", "dark-b.png": "NORMAL", "bright-c.png": "PNEUMONIA",
                "dark-d.png": "NORMAL", "twin-1.png": "PNEUMONIA", "twin-2.png": "PNEUMONIA",
                "slow.png": "NORMAL"}
    assert {n: rows[n]["label"] for n in expected} == expected
    assert all(rows[n]["status"] == "done" for n in expected)
    assert rows["twin-1.png"]["sha256"] == rows["twin-2.png"]["sha256"]
    assert rows["corrupt.png"]["status"] == "rejected" and rows["corrupt.png"]["error"]
    assert any((pipeline.rejected_dir).iterdir())
    assert not [p for p in inbox.rglob("*") if p.is_file()]


def test_files_dropped_while_the_watcher_is_down(pipeline):
    pipeline.stop_watcher()
    names = ["offline-1.png", "offline-2.png", "offline-3.png"]
    for name, level in zip(names, (250, 5, 240), strict=True):
        drop(pipeline.inbox, name, png_bytes(level))
    time.sleep(0.5)
    assert not any(n in pipeline.rows() for n in names)
    pipeline.start_watcher()
    rows = pipeline.wait_final(names)
    assert [rows[n]["label"] for n in names] == ["PNEUMONIA", "NORMAL", "PNEUMONIA"]


def test_promoting_a_new_version_switches_the_running_worker(pipeline):
    if pipeline.watcher is None:
        pipeline.start_watcher()
    worker_pid = pipeline.worker.pid
    infection = register_tiny_bundle(pipeline.db_url, pipeline.models_dir, "infection",
                                     bias=20.0)
    v2 = register_tiny_bundle(pipeline.db_url, pipeline.models_dir, "pneumonia", bias=20.0)
    drop(pipeline.inbox, "after-promote.png", png_bytes(60))
    rows = pipeline.wait_final(["after-promote.png"])
    row = rows["after-promote.png"]
    assert (row["label"], row["pneumonia_model"], row["infection_model"]) == (
        Label.VIRUS, v2, infection)
    assert pipeline.worker.pid == worker_pid and pipeline.worker.poll() is None
    _set_production(pipeline.db_url, "pneumonia", None)
    drop(pipeline.inbox, "no-model.png", png_bytes(60))
    pipeline.wait_status(["no-model.png"], {"waiting_model"})
    _set_production(pipeline.db_url, "pneumonia", v2)
    rows = pipeline.wait_final(["no-model.png"])  # the watcher's reconcile pass re-queues it
    assert rows["no-model.png"]["label"] == Label.VIRUS
    with session_scope(pipeline.db_url) as session:
        statuses = {s for (s,) in session.query(Image.status)}
    assert statuses <= {ImageStatus.DONE, ImageStatus.REJECTED}


def test_celery_contract_and_what_flower_sees():
    """Late acks, prefetch 1, JSON only, no result backend; the message names only id and file."""
    import json

    from worker.classify.celery_app import CLASSIFY_TASK, make_app
    from worker.settings import Settings

    db_number = random.randint(4, 15)
    client = shared_redis(db_number)
    queue = f"cxr-test-{uuid.uuid4().hex[:8]}"
    app = make_app(Settings(broker_url=f"redis://{SHARED_REDIS}/{db_number}", queue=queue))
    conf = app.conf
    assert (conf.task_acks_late, conf.task_reject_on_worker_lost) == (True, True)
    assert conf.worker_prefetch_multiplier == 1 and conf.task_ignore_result is True
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_routes[CLASSIFY_TASK] == {"queue": queue}
    from worker.classify.tasks import classify_images

    assert classify_images.name == CLASSIFY_TASK
    with app.connection_for_write() as conn:
        app.send_task(CLASSIFY_TASK, args=[[42]], argsrepr="(image_ids=[42], files=['IM-1.jpeg'])",
                      kwargsrepr="{}", queue=queue, connection=conn)
    try:
        [raw] = client.lrange(queue, 0, -1)
        message = json.loads(raw)
        headers = message["headers"]
        assert headers["task"] == CLASSIFY_TASK
        assert headers["argsrepr"] == "(image_ids=[42], files=['IM-1.jpeg'])"
        assert message["content-type"] == "application/json"
    finally:
        client.delete(queue, *client.keys(f"*{queue}*"))
        client.close()
