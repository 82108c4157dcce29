"""Real-process pipeline harness for the reliability tests: a private redis-server, a Celery
worker, the watcher, an optional TCP proxy in front of PostgreSQL, and test-only model layers.

Each harness owns its Redis server (own port, no persistence), so tests can stop it and never
touch anyone else's database. Processes start in their own sessions and are stopped by the
context managers here, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
POSTGRES_URL = os.environ.get("CXR_TEST_POSTGRES_URL")
FINAL = frozenset({"done", "rejected", "failed"})
CXR_COMMAND = [sys.executable, "-c", "import sys; from worker.cli import main; sys.exit(main())"]
CRASH_EXIT_CODE = 70
"""Exit status of a worker process killed by the test-only ``CrashOnBright`` layer."""


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


SHARED_REDIS = "127.0.0.1:6379"


def shared_redis(db: int):
    """A client on db ``db`` of the Redis every test machine runs (never db 0: other people's
    brokers live there); the caller flushes it. Tests that stop Redis use ``RedisServer``."""
    import redis

    assert db != 0
    client = redis.Redis.from_url(f"redis://{SHARED_REDIS}/{db}", socket_connect_timeout=1)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"no Redis at {SHARED_REDIS} ({exc}); `make services` starts it")
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL of its process group (children included) if it hangs."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its group (e.g. pool children)


def rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class RedisServer:
    """A private ``redis-server`` on a free port; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, workdir: Path, password: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 1) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 1):
        import redis

        return redis.Redis.from_url(self.url(db), socket_connect_timeout=1)

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            argv += ["--requirepass", self.password]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115  (closed with the process)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except Exception:
                return False

        wait_until(up, 10, "redis-server to answer")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class TcpProxy:
    """A loopback TCP forwarder the test can cut (connections dropped, new ones refused)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)
        self._listener = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (the database 'goes away')."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()

    stop = cut


def postgres_schema_url(base_url: str, schema: str) -> str:
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def postgres_schema() -> Iterator[tuple[str, str]]:
    """A fresh schema on the test PostgreSQL: yields (schema, url); dropped afterwards."""
    from sqlalchemy import create_engine, text

    assert POSTGRES_URL
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema, postgres_schema_url(POSTGRES_URL, schema)
    finally:
        from db.session import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


WORKER_WITH_TEST_LAYERS = (
    "import sys; sys.path.insert(0, {tests!r}); import helpers_pipeline; "
    "helpers_pipeline.install_worker_hooks(); from celery.__main__ import main; sys.exit(main())"
)


@dataclass
class Pipeline:
    """Paths, environment and processes of one pipeline (watcher + worker + private Redis)."""

    root: Path
    env: dict[str, str]
    db_url: str
    redis: RedisServer | None
    """None when the pipeline's broker is the shared Redis (nothing of its own to stop)."""
    worker: subprocess.Popen | None = None
    watcher: subprocess.Popen | None = None
    test_layers: bool = False
    concurrency: int = 1
    _logs: list = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    @property
    def inbox(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def rejected_dir(self) -> Path:
        return self.data_dir / "rejected"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    def start_worker(self) -> None:
        queue = self.env["CXR_QUEUE"]
        args = ["-A", "worker", "worker", "--pool", "prefork", "-c", str(self.concurrency),
                "-Q", queue, "--without-mingle", "--without-gossip", "-l", "INFO"]
        if self.test_layers:
            argv = [sys.executable, "-c", WORKER_WITH_TEST_LAYERS.format(tests=str(TESTS_DIR)),
                    *args]
        else:
            argv = [sys.executable, "-m", "celery", *args]
        log = open(self.root / "worker.log", "ab")  # noqa: SIM115
        self.worker = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop_worker(self) -> None:
        stop_process(self.worker, timeout=30)
        self.worker = None

    def start_watcher(self) -> None:
        log = open(self.root / "watcher.log", "ab")  # noqa: SIM115
        self.watcher = subprocess.Popen([*CXR_COMMAND, "watch"], env=self.env, cwd=ROOT,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

    def stop_watcher(self) -> None:
        stop_process(self.watcher)
        self.watcher = None

    def kill_watcher(self) -> None:
        if self.watcher is not None:
            os.killpg(self.watcher.pid, signal.SIGKILL)
            self.watcher.wait()
            self.watcher = None

    def worker_children(self) -> list[int]:
        return child_pids(self.worker.pid) if self.worker else []

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.worker, self.watcher))

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def rows(self) -> dict[str, dict]:
        from sqlalchemy import text

        from db.session import session_scope

        with session_scope(self.db_url) as session:
            result = session.execute(text("SELECT * FROM results ORDER BY id"))
            return {row["file_name"]: dict(row) for row in result.mappings()}

    def stored_paths(self) -> dict[str, Path]:
        """file name -> where its bytes are now (archive/ or rejected/), from the images table."""
        from sqlalchemy import text

        from db.session import session_scope

        with session_scope(self.db_url) as session:
            rows = session.execute(text("SELECT file_name, stored_path FROM images"))
            return {name: self.data_dir / stored for name, stored in rows if stored}

    def count(self, sql: str, **params) -> int:
        from sqlalchemy import text

        from db.session import session_scope

        with session_scope(self.db_url) as session:
            return int(session.execute(text(sql), params).scalar_one())

    def dump(self) -> None:
        print("--- worker.log ---\n", self.log("worker")[-5000:])
        print("--- watcher.log ---\n", self.log("watcher")[-4000:])
        with contextlib.suppress(Exception):
            print({n: (r["status"], r["error"]) for n, r in self.rows().items()})

    def wait_status(self, names, statuses, timeout: float = 90.0) -> dict[str, dict]:
        def ready():
            rows = self.rows()
            if all(rows.get(n, {}).get("status") in statuses for n in names):
                return rows
            return None

        try:
            return wait_until(ready, timeout, f"{len(names)} file(s) to reach {set(statuses)}")
        except AssertionError:
            self.dump()
            raise

    def wait_final(self, names, timeout: float = 90.0) -> dict[str, dict]:
        return self.wait_status(names, FINAL, timeout)


@contextlib.contextmanager
def pipeline_session(
    root: Path,
    db_url: str | None = None,
    *,
    redis_password: str | None = None,
    env: dict[str, str] | None = None,
    test_layers: bool = False,
    concurrency: int = 1,
    start: bool = True,
) -> Iterator[Pipeline]:
    """A migrated database, a private Redis and (``start``) a worker and a watcher."""
    from db.migrate import upgrade
    from db.session import dispose_engines

    root = Path(root)
    db_url = db_url or f"sqlite:///{root / 'cxr.db'}"
    upgrade(db_url)
    redis = RedisServer(root / "redis", password=redis_password)
    redis.start()
    full_env = {
        **os.environ,
        "CXR_DATA_DIR": str(root / "var"),
        "CXR_DATABASE_URL": db_url,
        "CXR_BROKER_URL": redis.url(1),
        "CXR_QUEUE": f"cxr-test-{uuid.uuid4().hex[:8]}",
        "CXR_STABLE_SECONDS": "0.5",
        "CXR_RESCAN_SECONDS": "1",
        "CXR_VISIBILITY_TIMEOUT": "30",
        "CXR_TF_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    p = Pipeline(root, full_env, db_url, redis, test_layers=test_layers, concurrency=concurrency)
    p.inbox.mkdir(parents=True, exist_ok=True)
    try:
        if start:
            p.start_worker()
            p.start_watcher()
        yield p
    finally:
        p.stop_watcher()
        p.stop_worker()
        redis.stop()
        dispose_engines()


def png_bytes(level: int, size: int = 40, seed: int | None = None) -> bytes:
    """A grey PNG near ``level``; two pixels from ``seed`` make its content unique."""
    import io

    from PIL import Image

    rng = random.Random(seed if seed is not None else uuid.uuid4().int)
    img = Image.new("L", (size, size), level)
    img.putpixel((0, 0), rng.randrange(256))
    img.putpixel((1, 0), rng.randrange(256))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write under a dot name, then rename into place: how a careful copier delivers."""
    target = inbox / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{uuid.uuid4().hex}.part")
    tmp.write_bytes(data)
    tmp.rename(target)
    return target


def register_bundle(db_url: str, models_dir: Path, stage: str, model, **manifest_extra) -> int:
    """Publish and promote ``model`` (any Keras model, raw RGB 32 px in, sigmoid out)."""
    from helpers_models import tiny_manifest

    from trainer.training.publish import publish_model

    manifest = tiny_manifest(stage, 0, int(model.inputs[0].shape[1]), params={"test": True},
                             code_version="test", **manifest_extra)
    return publish_model(model, manifest, models_dir=models_dir, db_url=db_url,
                         promote=True).version


def build_slow_model(input_size: int = 32, upsample: int = 32, layers: int = 4):
    """The tiny brightness answer behind real, slow convolutions (no hooks: standard layers).

    The convolutions run on an upsampled copy and feed a zero-weight branch, so the answer
    stays ``sigmoid(12 * (mean/255 - 0.5))`` while each call costs seconds of CPU.
    """
    import keras
    import numpy as np

    from trainer.model.preprocessing import Preprocess

    inputs = keras.Input((input_size, input_size, 3))
    x = Preprocess("scale01")(inputs)
    bright = keras.layers.GlobalAveragePooling2D()(x)
    y = keras.layers.UpSampling2D(upsample)(x)
    for _ in range(layers):
        y = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(y)
    busy = keras.layers.GlobalAveragePooling2D()(y)
    merged = keras.layers.Concatenate()([bright, busy])
    head = keras.layers.Dense(1, activation="sigmoid")
    out = head(merged)
    weights = np.zeros((3 + 32, 1), dtype=np.float32)
    weights[:3] = 4.0
    head.set_weights([weights, np.array([-6.0], dtype=np.float32)])
    return keras.Model(inputs, out)


def _crash_layer_class():
    """``CrashOnBright``: ends its process with os._exit when an image's mean pixel > 200.

    Test-only: a registered Keras layer (so the bundle loads in safe mode), installed in a
    worker only by ``install_worker_hooks``; nothing in the product imports it.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    existing = keras.saving.get_registered_object("cxr_test>CrashOnBright")
    if existing is not None:
        return existing

    def check(x):
        if float(np.mean(x)) > 200.0:
            os._exit(CRASH_EXIT_CODE)
        return x

    @keras.saving.register_keras_serializable(package="cxr_test")
    class CrashOnBright(keras.layers.Layer):
        def call(self, inputs):
            out = tf.numpy_function(check, [tf.cast(inputs, tf.float32)], tf.float32)
            return tf.ensure_shape(out, inputs.shape)

        def compute_output_shape(self, input_shape):
            return input_shape

    return CrashOnBright


def build_crash_model(input_size: int = 32):
    """The tiny brightness model with ``CrashOnBright`` in front (bright images kill the worker)."""
    import keras
    from helpers_models import build_tiny_model

    tiny = build_tiny_model(input_size)
    inputs = keras.Input((input_size, input_size, 3))
    x = _crash_layer_class()()(inputs)
    return keras.Model(inputs, tiny(x))


def install_worker_hooks() -> None:
    """Run in a worker's main process: each pool process registers the test layers."""
    from celery.signals import worker_process_init

    @worker_process_init.connect(weak=False)
    def _register(**_kwargs) -> None:
        _crash_layer_class()
