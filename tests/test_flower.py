"""Flower: the command we build, and a real Flower watching a real worker over Redis.

The integration test runs three real processes against a dedicated Redis database: a Celery
worker (solo pool), Flower from ``flower_command``, and a short enqueuer using the pipeline's
own ``enqueue``; then it reads Flower's HTTP API the way an operator's browser would.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from db.exceptions import FlowerConfigError
from worker.cli import build_parser
from worker.ops.flower import (
    check_flower_settings,
    flower_command,
    flower_env,
)
from worker.settings import Settings

USER, PASSWORD = "tester", f"pw-{uuid.uuid4().hex[:12]}"
IMAGE_IDS = [990001, 990002, 990003]


def make_settings(**overrides) -> Settings:
    return Settings(_env_file=None, **overrides)


def flower_options(argv: list[str]) -> dict[str, str]:
    assert argv[1:3] == ["-m", "worker.ops.flower"]
    return dict(arg[2:].split("=", 1) for arg in argv[3:])


def test_command_carries_no_secret():
    settings = make_settings(
        broker_url="redis://:broker-secret@redis.internal:6379/0",
        flower_basic_auth="admin:flower-secret",
        flower_address="0.0.0.0",
        flower_port=5600,
    )
    argv = flower_command(settings)
    line = " ".join(argv)
    assert "broker-secret" not in line and "flower-secret" not in line
    assert flower_options(argv) == {
        "address": "0.0.0.0",
        "port": "5600",
        "persistent": "False",
        "purge_offline_workers": "300",
    }
    env = flower_env(settings, base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "CXR_BROKER_URL": "redis://:broker-secret@redis.internal:6379/0",
        "CXR_FLOWER_BASIC_AUTH": "admin:flower-secret",
    }


def test_command_uses_only_real_flower_options():
    from flower.options import default_options

    argv = flower_command(make_settings())
    for name in flower_options(argv):
        assert name in default_options, name


def test_env_drops_stale_credentials_when_auth_is_off():
    stale = {"CXR_FLOWER_BASIC_AUTH": "a:b", "FLOWER_BASIC_AUTH": "a:b"}
    env = flower_env(make_settings(), base=stale)
    assert "CXR_FLOWER_BASIC_AUTH" not in env and "FLOWER_BASIC_AUTH" not in env


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost"])
def test_loopback_without_password_is_allowed(address):
    check_flower_settings(make_settings(flower_address=address))


@pytest.mark.parametrize("address", ["0.0.0.0", "", "10.1.2.3", "flower.example.org"])
def test_network_address_without_password_is_refused(address):
    with pytest.raises(FlowerConfigError, match="CXR_FLOWER_BASIC_AUTH"):
        flower_command(make_settings(flower_address=address))
    check_flower_settings(make_settings(flower_address=address, flower_basic_auth="a:b"))


@pytest.mark.parametrize("auth", ["admin", "admin:", ":pw", "a:b,c"])
def test_malformed_basic_auth_is_refused(auth):
    with pytest.raises(FlowerConfigError, match="user:password"):
        check_flower_settings(make_settings(flower_basic_auth=auth))


def test_several_users_and_colons_in_passwords_are_accepted():
    check_flower_settings(make_settings(flower_basic_auth="ann:p:w,bob:x"))


def test_cli_registers_flower():
    args = build_parser().parse_args(["flower", "--port", "5601", "--address", "0.0.0.0"])
    assert (args.port, args.address) == (5601, "0.0.0.0")
    assert args.func.__module__ == "worker.cli.flower"


def test_cxr_flower_refuses_an_open_network_flower(monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.delenv("CXR_FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.setenv("CXR_FLOWER_ADDRESS", "0.0.0.0")
    assert main(["flower"]) == 2
    captured = capsys.readouterr()
    assert "without a password" in captured.err and "Flower on" not in captured.out


# --- a real worker and a real Flower ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, None


def wait_for(what: str, check: Callable[[], object], logs: list[Path], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def child_env(tmp_path: Path, broker: str) -> dict[str, str]:
    """The test's environment without any CXR_*/FLOWER_* of the developer's, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "FLOWER_"))}
    env.update(
        CXR_BROKER_URL=broker,
        CXR_DATA_DIR=str(tmp_path / "data"),
        CXR_DATABASE_URL=f"sqlite:///{tmp_path / 'data' / 'cxr.db'}",
        CXR_QUEUE="inference",
        CXR_TF_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def broker(tmp_path) -> Iterator[str]:
    """A private redis-server on its own port: two runs on one host never share a queue."""
    from helpers_pipeline import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server.url(0)
    finally:
        server.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_flower_shows_worker_and_finished_tasks(tmp_path, broker, processes):
    from db.migrate import upgrade

    env = child_env(tmp_path, broker)
    settings = make_settings(
        data_dir=tmp_path / "data",
        broker_url=broker,
        flower_port=free_port(),
        flower_basic_auth=f"{USER}:{PASSWORD}",
    )
    settings.ensure_dirs()
    upgrade(env["CXR_DATABASE_URL"])
    node = f"flowertest-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    worker_log, flower_log = tmp_path / "worker.log", tmp_path / "flower.log"
    logs = [worker_log, flower_log]

    worker_argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "inference",
                   "--pool", "solo", "-n", node, "--without-mingle", "--without-gossip",
                   "-l", "INFO"]
    with worker_log.open("w") as out:
        processes.append(subprocess.Popen(worker_argv, env=env, cwd=tmp_path, stdout=out,
                                          stderr=subprocess.STDOUT))
    argv = flower_command(settings)
    with flower_log.open("w") as out:
        flower = subprocess.Popen(argv, env=flower_env(settings, base=env), cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT)
    processes.append(flower)
    assert PASSWORD not in Path(f"/proc/{flower.pid}/cmdline").read_bytes().decode()

    base = f"http://127.0.0.1:{settings.flower_port}"
    auth = (USER, PASSWORD)
    wait_for("Flower to answer", lambda: http_get(f"{base}/healthcheck")[0] == 200, logs)

    def worker_heard():
        # status=1 answers from Flower's event state: tasks sent from now on will be seen.
        status, body = http_get(f"{base}/api/workers?status=1", auth)
        return status == 200 and isinstance(body, dict) and body.get(node) is True

    wait_for("the worker's heartbeat in /api/workers", worker_heard, logs)

    names = {i: f"scan-{i}.png" for i in IMAGE_IDS}
    enqueue = ("from worker.classify.broker import enqueue_batch\n"
               f"for i, n in {names!r}.items(): enqueue_batch([(i, n)])")
    subprocess.run([sys.executable, "-c", enqueue], env=env, cwd=tmp_path, check=True,
                   timeout=120)

    def finished_tasks():
        status, body = http_get(f"{base}/api/tasks", auth)
        if status != 200:
            return None
        ours = {t.get("args"): t for t in body.values() if t.get("name") == "cxr.classify_images"}
        done = [t for t in ours.values() if t.get("state") == "SUCCESS"]
        return ours if len(done) >= len(IMAGE_IDS) else None

    tasks = wait_for("three SUCCESS tasks in /api/tasks", finished_tasks, logs)
    expected_args = {f"(image_ids=[{i}], files=[{n!r}])" for i, n in names.items()}
    assert set(tasks) == expected_args
    for task in tasks.values():
        assert task["state"] == "SUCCESS"
        assert task["kwargs"] == "{}"
        assert task["result"] == "{}", "an unknown image id is a no-op"
        assert task["worker"] == node
        assert str(tmp_path) not in json.dumps(task), "no paths leak into Flower"

    for path in ("/api/workers", "/api/tasks", "/"):
        assert http_get(base + path)[0] == 401
        assert http_get(base + path, (USER, "wrong"))[0] == 401
