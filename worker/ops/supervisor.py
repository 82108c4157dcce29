"""``cxr up``: watcher, worker(s), Flower (and a private Redis if needed) in the foreground.

A small supervisor for one machine: it restarts a child that dies, with a growing delay and
a line saying so, and stops every child cleanly on Ctrl-C or SIGTERM. Children run in their
own sessions so a terminal Ctrl-C reaches only the supervisor, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from db.exceptions import BrokerUnavailableError
from db.session import redacted_url
from worker.settings import Settings

log = logging.getLogger(__name__)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})
REDIS_START_TIMEOUT_S = 10.0
CXR_COMMAND = [sys.executable, "-c", "import sys; from worker.cli import main; sys.exit(main())"]
"""Runs ``cxr`` with this interpreter (no dependence on the console script being on PATH)."""


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM if its parent (the supervisor, the bench) is killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    """Starts the children, restarts those that exit, stops them all when ``stop`` is set."""

    def __init__(
        self,
        specs: list[ChildSpec],
        *,
        backoff_start: float = 1.0,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        stop_timeout: float = 20.0,
        say: Callable[[str], None] | None = None,
    ):
        self.children = [_Child(spec) for spec in specs]
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.say = say or (lambda line: print(f"cxr up: {line}", flush=True))
        self.restarts = 0

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(
            child.spec.argv,
            env=child.spec.env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started_at = time.monotonic()

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.proc.pid for c in self.children if c.proc and c.proc.poll() is None}

    def _check(self, child: _Child, now: float) -> None:
        if child.proc is None:
            if now >= child.restart_at:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            if child.failures and now - child.started_at >= self.stable_after:
                child.failures = 0
            return
        delay = min(self.backoff_max, self.backoff_start * 2**child.failures)
        child.failures += 1
        child.proc = None
        child.restart_at = now + delay
        self.restarts += 1
        self.say(f"{child.spec.name} exited with code {code}; restarting in {delay:g}s")

    def run(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        for child in self.children:
            self._start(child)
            self.say(f"started {child.spec.name} (pid {child.proc.pid})")
        try:
            while not stop.is_set():
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
                stop.wait(poll_seconds)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM every child (last started first), wait, then SIGKILL what is left."""
        running = [c for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.spec.name} did not stop in time; killing it")
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        for child in running:
            self.say(f"stopped {child.spec.name}")


def broker_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis at ``url`` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def private_redis(url: str, data_dir: Path) -> ChildSpec:
    """A child spec for a throw-away local Redis matching ``url``, or why there can be none."""
    parts = urlsplit(url)
    where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    if parts.scheme != "redis" or (parts.hostname or "") not in LOCAL_HOSTS:
        raise BrokerUnavailableError(
            f"nothing answers at the broker {parts.scheme}://{where}. Start that Redis, or set "
            "CXR_BROKER_URL to a reachable one (e.g. redis://localhost:6379/0)."
        )
    server = shutil.which("redis-server")
    if server is None:
        raise BrokerUnavailableError(
            f"nothing answers at the broker redis://{where} and redis-server is not installed. "
            "Install Redis (Debian/Ubuntu: sudo apt install redis-server; macOS: brew install "
            "redis; or docker run -p 6379:6379 redis:7), or set CXR_BROKER_URL to a running "
            "Redis."
        )
    workdir = data_dir.absolute() / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    config = workdir / "redis.conf"
    lines = [
        f"port {parts.port or 6379}",
        "bind 127.0.0.1 ::1" if parts.hostname in ("::1",) else "bind 127.0.0.1",
        'save ""',
        "appendonly no",
        f"dir {workdir}",
        "daemonize no",
    ]
    if parts.password:
        lines.append(f"requirepass {_redis_config_quote(unquote(parts.password))}")
    config.write_text("\n".join(lines) + "\n")
    os.chmod(config, 0o600)
    return ChildSpec("redis", [server, str(config)])


def _redis_config_quote(value: str) -> str:
    """A redis.conf argument in double quotes (a password may hold spaces, quotes, #)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def child_env(settings: Settings) -> dict[str, str]:
    """Environment for children: the same settings, with paths made absolute."""
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.absolute())
    env["CXR_INBOX"] = str(settings.inbox_dir)
    env["CXR_MODELS_DIR"] = str(settings.models_path)
    env["CXR_DATABASE_URL"] = settings.db_url
    env["CXR_BROKER_URL"] = settings.broker_url
    return env


def child_specs(
    settings: Settings,
    *,
    flower: bool = True,
    polling: bool = False,
    concurrency: int | None = None,
    web: bool = False,
) -> list[ChildSpec]:
    env = child_env(settings)
    cli = CXR_COMMAND
    specs = [
        ChildSpec("watcher", [*cli, "watch", *(["--polling"] if polling else [])], env),
        ChildSpec(
            "worker",
            [*cli, "worker", "--concurrency", str(concurrency or settings.worker_concurrency)],
            env,
        ),
    ]
    specs += dicom_specs(settings, env)
    if flower:
        try:
            from worker.ops.flower import flower_command, flower_env
        except ImportError:
            pass
        else:
            specs.append(ChildSpec("flower", flower_command(settings), flower_env(settings, env)))
    if web:  # the review app; `cxr up` checked its sign-in settings before starting anything
        specs.append(ChildSpec("web", [*cli, "web"], env))
    return specs


def dicom_specs(settings: Settings, env: dict[str, str]) -> list[ChildSpec]:
    """The DICOM listener when CXR_DICOM_PORT is set; the sender when results have somewhere
    to go (CXR_DICOM_DESTINATIONS or CXR_DICOM_EXPORT_DIR)."""
    specs = []
    if settings.dicom_port is not None:
        specs.append(ChildSpec("dicom-listener", [*CXR_COMMAND, "dicom", "listen"], env))
    if settings.dicom_destinations.strip() or settings.dicom_export_dir:
        specs.append(ChildSpec("dicom-sender", [*CXR_COMMAND, "dicom", "send"], env))
    return specs


def _wait_for_broker(url: str, proc_alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if broker_answers(url, timeout=0.5):
            return
        if not proc_alive():
            break
        time.sleep(0.2)
    raise BrokerUnavailableError(
        f"the private redis-server for {redacted_url(url)} did not start; check CXR_BROKER_URL"
    )


def _serve_metrics(settings: Settings, specs: list[ChildSpec]) -> None:
    """The children write their metrics into one private folder; this process serves them."""
    if not settings.metrics_port:
        return
    from worker.ops.metrics_server import child_metrics_env, prepare_dir, serve

    path = prepare_dir(settings, "up")
    if path is None:
        return
    for spec in specs:
        if spec.env is not None:
            spec.env.update(child_metrics_env(path))
    if serve(settings, path):
        print(f"cxr up: metrics on http://{settings.metrics_address}:{settings.metrics_port}"
              "/metrics", flush=True)


def up(settings: Settings, *, flower: bool = True, polling: bool = False,
       concurrency: int | None = None, stop: threading.Event | None = None,
       web: bool = False) -> int:
    """Run everything in the foreground until Ctrl-C/SIGTERM (or ``stop`` is set)."""
    settings.ensure_dirs()
    specs: list[ChildSpec] = []
    redis_proc: subprocess.Popen | None = None
    if not broker_answers(settings.broker_url):
        spec = private_redis(settings.broker_url, settings.data_dir)
        redis_proc = subprocess.Popen(spec.argv, start_new_session=True,
                                      stdout=subprocess.DEVNULL,
                                      preexec_fn=die_with_parent)
        print(f"cxr up: started a private redis-server (pid {redis_proc.pid})", flush=True)
        _wait_for_broker(settings.broker_url, lambda: redis_proc.poll() is None)
    try:
        from db.migrate import ensure_schema

        if ensure_schema(settings.db_url):
            print("cxr up: created the database schema", flush=True)
        specs = child_specs(settings, flower=flower, polling=polling, concurrency=concurrency,
                            web=web)
        _serve_metrics(settings, specs)
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        print(f"cxr up: inbox {settings.inbox_dir}; Ctrl-C stops everything", flush=True)
        Supervisor(specs).run(stop)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
            print("cxr up: stopped the private redis-server", flush=True)
    return 0
