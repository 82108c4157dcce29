"""``cxr up``: restart with backoff, clean stop, the private Redis, the schema bootstrap, and
one real run of the whole thing (private Redis, watcher, worker) from drop to result."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage

from db.exceptions import BrokerUnavailableError
from db.migrate import ensure_schema
from worker.ops.supervisor import (
    CXR_COMMAND,
    ChildSpec,
    Supervisor,
    broker_answers,
    private_redis,
)

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restarts_a_dying_child_with_backoff_and_stops_everything():
    lines: list[str] = []
    sup = Supervisor(
        [ChildSpec("flaky", _py("import sys; sys.exit(3)")),
         ChildSpec("steady", _py("import time; time.sleep(120)"))],
        backoff_start=0.1, backoff_max=0.4, say=lines.append,
    )
    stop = threading.Event()
    thread = threading.Thread(target=sup.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _wait_until(lambda: sup.restarts >= 4)
        steady_pid = sup.pids()["steady"]
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    restarts = [line for line in lines if line.startswith("flaky exited with code 3")]
    assert restarts[:4] == [
        "flaky exited with code 3; restarting in 0.1s",
        "flaky exited with code 3; restarting in 0.2s",
        "flaky exited with code 3; restarting in 0.4s",
        "flaky exited with code 3; restarting in 0.4s",
    ]
    assert "stopped steady" in lines
    assert not _alive(steady_pid)


def test_a_child_ignoring_sigterm_is_killed(tmp_path):
    marker = tmp_path / "ready"
    code = (f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(marker)!r}).touch(); time.sleep(120)")
    lines: list[str] = []
    sup = Supervisor([ChildSpec("stubborn", _py(code))], stop_timeout=0.5, say=lines.append)
    stop = threading.Event()
    thread = threading.Thread(target=sup.run, args=(stop,), daemon=True)
    thread.start()
    _wait_until(marker.exists)
    pid = sup.pids()["stubborn"]
    stop.set()
    thread.join(30)
    assert "stubborn did not stop in time; killing it" in lines
    assert not _alive(pid)


def test_no_broker_and_no_redis_server_says_what_to_install(monkeypatch, tmp_path):
    with pytest.raises(BrokerUnavailableError, match="CXR_BROKER_URL"):
        private_redis("redis://redis.example.org:6379/0", tmp_path)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BrokerUnavailableError, match="apt install redis-server"):
        private_redis("redis://localhost:6380/0", tmp_path)


def test_private_redis_answers_on_the_url_port_with_its_password(tmp_path):
    port = _free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    spec = private_redis(url, tmp_path)
    assert "s3cret" not in " ".join(spec.argv)
    assert 'save ""' in (tmp_path / "redis" / "redis.conf").read_text()
    proc = subprocess.Popen(spec.argv, stdout=subprocess.DEVNULL)
    try:
        _wait_until(lambda: broker_answers(url, timeout=0.2), timeout=10)
        assert not broker_answers(f"redis://:wrong@127.0.0.1:{port}/0", timeout=0.5)
    finally:
        proc.terminate()
        proc.wait(10)
    assert not broker_answers(url, timeout=0.2)


def test_brand_new_sqlite_database_is_created(tmp_path):
    from db.migrate import check_schema

    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert ensure_schema(url) is True
    check_schema(url)
    assert ensure_schema(url) is False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cxr_up_runs_everything_and_ctrl_c_stops_it(tmp_path):
    from helpers_models import register_tiny_bundle
    from sqlalchemy import text

    from db.session import dispose_engines, session_scope

    port = _free_port()
    data = tmp_path / "var"
    env = {**os.environ, "CXR_DATA_DIR": str(data), "CXR_BROKER_URL": f"redis://127.0.0.1:{port}/0",
           "CXR_STABLE_SECONDS": "0.3", "CXR_RESCAN_SECONDS": "1", "CXR_TF_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("CXR_DATABASE_URL", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CXR_COMMAND, "up", "--no-flower"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: "started worker" in log.read_text(), timeout=60)
        db_url = f"sqlite:///{(data / 'cxr.db').absolute()}"
        register_tiny_bundle(db_url, data / "models", "pneumonia")
        PILImage.new("L", (40, 40), 250).save(data / "inbox" / "chest.png")

        def result():
            with session_scope(db_url) as session:
                return session.execute(text("SELECT status, label FROM results")).all()

        _wait_until(lambda: result() == [("done", "PNEUMONIA")], timeout=120)
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", log.read_text())]
        assert len(pids) == 3  # redis, watcher, worker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dispose_engines()
    text_out = log.read_text()
    assert "started a private redis-server" in text_out
    assert "stopped watcher" in text_out and "stopped worker" in text_out
    assert not any(_alive(pid) for pid in pids)
    assert not broker_answers(env["CXR_BROKER_URL"], timeout=0.2)
