"""End to end with real parts: watcher and ``celery -A worker worker`` processes, Redis on
127.0.0.1:6379 (a private db number and queue, flushed), SQLite and PostgreSQL, tiny real
Keras bundles. One worker per backend serves every scenario below, so a promotion is seen
by an already-running worker.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, text, update

from db.models import Image, ImageStatus, Label, ModelStatus, ModelVersion
from db.session import dispose_engines, session_scope
from trainer.testing import register_tiny_bundle
from worker.supervisor import CXR_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REDIS_HOST = "127.0.0.1:6379"
POSTGRES_URL = os.environ.get("CXR_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]
ROOT = Path(__file__).resolve().parents[1]


def _redis(db: int):
    """A client on Redis db ``db`` (never db 0: other people's brokers live there)."""
    import redis

    assert db != 0
    try:
        client = redis.Redis.from_url(f"redis://{REDIS_HOST}/{db}", socket_connect_timeout=1)
        client.ping()
    except Exception:
        pytest.skip(f"no Redis at {REDIS_HOST}")
    return client


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Pipeline:
    root: Path
    env: dict[str, str]
    db_url: str
    inbox: Path
    models_dir: Path
    worker: subprocess.Popen
    watcher: subprocess.Popen | None = None

    def start_watcher(self) -> None:
        log = open(self.root / "watcher.log", "ab")  # noqa: SIM115  (closed with the process)
        self.watcher = subprocess.Popen(
            [*CXR_COMMAND, "watch"], env=self.env, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT,
        )

    def stop_watcher(self) -> None:
        if self.watcher is not None:
            _stop(self.watcher)
            self.watcher = None

    def rows(self) -> dict[str, dict]:
        with session_scope(self.db_url) as session:
            result = session.execute(text("SELECT * FROM results ORDER BY id"))
            return {row["file_name"]: dict(row) for row in result.mappings()}

    def wait_status(self, names: list[str], statuses: set[str], timeout: float = 90.0):
        def ready():
            rows = self.rows()
            if all(rows.get(n, {}).get("status") in statuses for n in names):
                return rows
            return None

        try:
            return wait_until(ready, timeout, f"{names} to reach {statuses}")
        except AssertionError:
            print((self.root / "worker.log").read_text()[-4000:])
            if (self.root / "watcher.log").exists():
                print((self.root / "watcher.log").read_text()[-3000:])
            print(self.rows())
            raise

    def wait_final(self, names: list[str], timeout: float = 90.0) -> dict[str, dict]:
        return self.wait_status(names, {"done", "rejected", "failed"}, timeout)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
            proc.wait()


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module", params=BACKENDS)
def pipeline(request, tmp_path_factory) -> Iterator[Pipeline]:
    db_number = random.randint(4, 15)
    redis_client = _redis(db_number)
    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    broker = f"redis://{REDIS_HOST}/{db_number}"
    queue = f"cxr-test-{uuid.uuid4().hex[:8]}"
    admin = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{root / 'cxr.db'}"
    else:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in POSTGRES_URL else "?"
        db_url = f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    from db.migrate import upgrade

    upgrade(db_url)
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(root / "var"),
        "CXR_DATABASE_URL": db_url,
        "CXR_BROKER_URL": broker,
        "CXR_QUEUE": queue,
        "CXR_STABLE_SECONDS": "0.5",
        "CXR_RESCAN_SECONDS": "1",
        "CXR_VISIBILITY_TIMEOUT": "60",
        "CXR_TF_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }
    assert redis_client.client_info()["db"] == db_number
    redis_client.flushdb()
    log = open(root / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "prefork", "-c",
         "1", "-Q", queue, "--without-mingle", "--without-gossip", "-l", "INFO"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    p = Pipeline(root, env, db_url, root / "var" / "inbox", root / "var" / "models", worker)
    (root / "var" / "inbox").mkdir(parents=True)
    try:
        yield p
    finally:
        p.stop_watcher()
        _stop(worker)
        log.close()
        redis_client.flushdb()
        redis_client.close()
        dispose_engines()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _png(path: Path, level: int, seed: int | None = None) -> bytes:
    """A 40 px grey PNG near ``level``; ``seed`` makes its content unique."""
    rng = random.Random(seed if seed is not None else uuid.uuid4().int)
    img = PILImage.new("L", (40, 40), level)
    img.putpixel((0, 0), rng.randrange(256))
    img.putpixel((1, 0), rng.randrange(256))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def _drop(inbox: Path, name: str, data: bytes) -> None:
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(inbox / name)


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
        _drop(pipeline.inbox, name, _png(pipeline.inbox / name, 250))
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
        _drop(inbox, name, _png(inbox / name, level))
    twin = _png(inbox / "twin.png", 240)
    _drop(inbox, "twin-1.png", twin)
    _drop(inbox, "twin-2.png", twin)
    (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    slow_data = _png(inbox / "slow.png", 15)
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
    assert any((pipeline.root / "var" / "rejected").iterdir())
    assert not [p for p in inbox.rglob("*") if p.is_file()]


def test_files_dropped_while_the_watcher_is_down(pipeline):
    pipeline.stop_watcher()
    names = ["offline-1.png", "offline-2.png", "offline-3.png"]
    for name, level in zip(names, (250, 5, 240), strict=True):
        _drop(pipeline.inbox, name, _png(pipeline.inbox / name, level))
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
    _drop(pipeline.inbox, "after-promote.png", _png(pipeline.inbox / "x.png", 60))
    rows = pipeline.wait_final(["after-promote.png"])
    row = rows["after-promote.png"]
    assert (row["label"], row["pneumonia_model"], row["infection_model"]) == (
        Label.VIRUS, v2, infection)
    assert pipeline.worker.pid == worker_pid and pipeline.worker.poll() is None
    _set_production(pipeline.db_url, "pneumonia", None)
    _drop(pipeline.inbox, "no-model.png", _png(pipeline.inbox / "y.png", 60))
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

    from worker.celery_app import CLASSIFY_TASK, make_app
    from worker.settings import Settings

    db_number = random.randint(4, 15)
    client = _redis(db_number)
    queue = f"cxr-test-{uuid.uuid4().hex[:8]}"
    app = make_app(Settings(broker_url=f"redis://{REDIS_HOST}/{db_number}", queue=queue))
    conf = app.conf
    assert (conf.task_acks_late, conf.task_reject_on_worker_lost) == (True, True)
    assert conf.worker_prefetch_multiplier == 1 and conf.task_ignore_result is True
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_routes[CLASSIFY_TASK] == {"queue": queue}
    from worker.tasks import classify_image

    assert classify_image.name == CLASSIFY_TASK
    with app.connection_for_write() as conn:
        app.send_task(CLASSIFY_TASK, args=[42], argsrepr="(image_id=42, file='IM-1.jpeg')",
                      kwargsrepr="{}", queue=queue, connection=conn)
    try:
        [raw] = client.lrange(queue, 0, -1)
        message = json.loads(raw)
        headers = message["headers"]
        assert headers["task"] == CLASSIFY_TASK
        assert headers["argsrepr"] == "(image_id=42, file='IM-1.jpeg')"
        assert message["content-type"] == "application/json"
    finally:
        client.delete(queue, *client.keys(f"*{queue}*"))
        client.close()
