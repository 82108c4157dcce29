"""``cxr bench`` against the real service: ``cxr up --no-flower`` (watcher + one worker) in a
private data dir with its own SQLite file and a private Redis queue, run by
``worker.ops.stack.LocalStack``; what the bench reads of it (rows, the worker's batch lines)
and the three measurements made through it: pipeline, latency and the watcher's intake."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text as sql_text

from db.vocabulary import FINAL_STATUSES
from worker.ops.bench_inputs import BenchConfig, Progress, copy_into
from worker.ops.stack import LocalStack
from worker.settings import Settings

BATCH_LINE = re.compile(r"batch of (\d+): decode (\d+) ms, forward (\d+) ms")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def start_stack(env: dict[str, str], log_path: Path) -> LocalStack:
    """``cxr up --no-flower`` with one worker process, in the bench's private data dir."""
    return LocalStack(env, log_path, "--no-flower", "--concurrency", "1")


def statuses(db_url: str, names: list[str]
             ) -> dict[str, tuple[str, datetime | None, datetime]]:
    """file name -> (status, finished_at, received_at) of the rows recorded so far."""
    from sqlalchemy import select

    from db.models import Image
    from db.session import session_scope

    with session_scope(db_url) as session:
        rows = session.execute(
            select(Image.file_name, Image.status, Image.finished_at, Image.received_at)
            .where(Image.file_name.in_(names))
        ).all()
    return {r.file_name: (r.status, r.finished_at, r.received_at) for r in rows}


def wait_done(stack: LocalStack, db_url: str, names: list[str], timeout: float,
              poll: float = 0.1) -> dict:
    """``statuses`` once every named row is final; raise if one is not ``done``, the stack
    exits or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        rows = statuses(db_url, names)
        if len(rows) == len(names) and all(
            s in FINAL_STATUSES for s, _, _ in rows.values()
        ):
            bad = {n: s for n, (s, _, _) in rows.items() if s != "done"}
            if bad:
                raise RuntimeError(f"bench images not classified: {bad}; see {stack.log_path}")
            return rows
        if not stack.running():
            raise RuntimeError(f"the stack exited; see {stack.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(names)} images not done in {timeout:.0f} s; "
                               f"see {stack.log_path}")
        time.sleep(poll)


def wait_count(stack: LocalStack, db_url: str, names: list[str], timeout: float,
               poll: float = 0.25) -> dict:
    """``wait_done`` for a burst: polls one indexed count (the stack's database holds only
    the bench's files), not K rows, so the bench's polling takes little from the cores it
    measures; then checks every row once. The clock stops at the last row's own
    ``finished_at``, so polling less often delays only the bench, not the figure: at 20 polls
    a second the bench's own process took 2 % of the cores it was timing (``--perf``)."""
    from sqlalchemy import func, select

    from db.models import Image
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    with session_scope(db_url) as session:
        target = len(names) + session.scalar(select(func.count()).select_from(Image))
    while True:
        with session_scope(db_url) as session:
            final = session.scalar(select(func.count()).select_from(Image).where(
                Image.status.in_(FINAL_STATUSES)))
        if final >= target or not stack.running() or time.monotonic() > deadline:
            return wait_done(stack, db_url, names, timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(poll)


def logged_batches(stack: LocalStack) -> list[tuple[int, int, int]]:
    """(size, decode ms, forward ms) of every batch the worker logged so far."""
    return [(int(n), int(d), int(f)) for n, d, f in BATCH_LINE.findall(stack.log_text())]


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def measure_pipeline(stack: LocalStack, settings: Settings, files: list[Path],
                     progress: Progress) -> dict[str, Any]:
    """K files dropped into the inbox at once, until K rows are ``done``.

    They are staged on the inbox's filesystem first and renamed in, as an export that writes
    to a temporary name does: the clock measures the service, not the copying.
    """
    names = [p.name for p in files]
    staged = settings.data_dir.absolute() / "staged"
    staged.mkdir(exist_ok=True)
    for path in files:
        shutil.copyfile(path, staged / path.name)
    before = len(logged_batches(stack))
    cpu_before = stack.cpu_seconds()
    started, wall = time.perf_counter(), time.time()
    for path in files:
        os.rename(staged / path.name, settings.inbox_dir / path.name)
    copied = time.perf_counter() - started
    progress(f"  dropped {len(files)} files in {copied:.2f} s; waiting for the rows")
    rows = wait_count(stack, settings.db_url, names, timeout=max(120.0, 10.0 * len(files)))
    cpu = cpu_ms_per_image(cpu_before, stack.cpu_seconds(), len(files))
    # The last row's own finished_at, not the moment a poll saw it.
    elapsed = max(_timestamp(finished) for _, finished, _ in rows.values()) - wall
    first_row = min(_timestamp(received) for _, _, received in rows.values()) - wall
    phases = intake_phases(rows, wall, elapsed)
    batches = logged_batches(stack)[before:]
    sizes = [n for n, _, _ in batches]
    forward_s = sum(f for _, _, f in batches) / 1000.0
    return {
        "images_per_s": len(files) / elapsed, "images": len(files), "seconds": elapsed,
        "window_unix": [wall, wall + elapsed],
        "copy_seconds": copied, "first_row_s": first_row, "batches": len(sizes),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "max_batch": max(sizes) if sizes else 0,
        "forward_s": forward_s, "decode_s": sum(d for _, d, _ in batches) / 1000.0,
        "forward_share": forward_s / elapsed, "cpu_ms_per_image": cpu,
        **phases,
    }


def cpu_ms_per_image(before: dict[str, float], after: dict[str, float], images: int
                     ) -> dict[str, float]:
    """ms of CPU an image each of the stack's commands used between two
    ``LocalStack.cpu_seconds`` readings; empty without them. Unlike the rate it leaves out
    idle cores: what the service spent, apart from how well it kept the cores busy."""
    if not before or not after or images <= 0:
        return {}
    return {role: (after[role] - before.get(role, 0.0)) * 1000.0 / images
            for role in after if after[role] > before.get(role, 0.0)}


def intake_phases(rows: dict, wall: float, elapsed: float
                  ) -> dict[str, float | int | None]:
    """The burst in two phases, from the rows' own timestamps: while the watcher was still
    taking it (until the last ``received_at``), and after. The watcher's intake runs on the
    cores the worker decodes on, so the worker's rate differs between the two; the whole
    figure is what the service did, these say where its time went."""
    intake_s = max(_timestamp(received) for _, _, received in rows.values()) - wall
    done_during = sum(1 for _, finished, _ in rows.values()
                      if _timestamp(finished) - wall <= intake_s)
    after_s = elapsed - intake_s
    return {"intake_s": intake_s, "done_during_intake": done_during,
            "after_intake_images_per_s": (len(rows) - done_during) / after_s
            if after_s > 0 and len(rows) > done_during else None}


def measure_latency(stack: LocalStack, settings: Settings, files: list[Path], gap_s: float,
                    progress: Progress) -> dict[str, Any]:
    """Files dropped one at a time ``gap_s`` apart: landing in the inbox -> ``done``."""
    landed: dict[str, float] = {}
    for i, path in enumerate(files, start=1):
        landed[path.name] = copy_into(settings.inbox_dir, path)
        wait_done(stack, settings.db_url, [path.name], timeout=120.0, poll=0.05)
        if i % 5 == 0:
            progress(f"  latency: {i}/{len(files)}")
        time.sleep(gap_s)
    rows = statuses(settings.db_url, list(landed))
    total = [_timestamp(rows[n][1]) - t for n, t in landed.items()]
    intake = [_timestamp(rows[n][2]) - t for n, t in landed.items()]
    return {
        "p50_s": percentile(total, 50), "p95_s": percentile(total, 95),
        "intake_p50_s": percentile(intake, 50), "images": len(files), "gap_s": gap_s,
    }


def measure_intake(root: Path, base: Settings, cfg: BenchConfig, files: list[Path],
                   progress: Progress) -> dict[str, Any]:
    """The watcher alone (``cxr watch``, its own data dir and queue, no worker): a burst of
    files renamed into the inbox at once, until every one is recorded and queued."""
    settings, env = stack_settings(root / "intake", base, cfg)
    settings.ensure_dirs()
    from db.migrate import upgrade

    upgrade(settings.db_url)
    staged = settings.data_dir / "staged"
    staged.mkdir()
    for path in files:  # same filesystem as the inbox: the burst itself is renames
        shutil.copyfile(path, staged / path.name)
    watcher = LocalStack(env, root / "intake" / "watcher.log", command="watch")
    try:
        watcher.wait_for_log("watching")
        started = time.perf_counter()
        for path in files:
            os.rename(staged / path.name, settings.inbox_dir / path.name)
        _wait_queued(watcher, settings.db_url, len(files))
        elapsed = time.perf_counter() - started
    finally:
        watcher.stop(timeout=30)
        forget_queue(settings)
    rate = len(files) / elapsed
    progress(f"  intake: {len(files)} files recorded and queued in {elapsed:.2f} s "
             f"({rate:.0f} files/s)")
    return {"files_per_s": rate, "files": len(files), "seconds": elapsed}


def _wait_queued(watcher: LocalStack, db_url: str, n: int) -> None:
    """Until ``n`` rows are ``queued`` (the watcher's database holds only the burst)."""
    from db.session import session_scope

    queued = 0
    while queued < n:
        if not watcher.running():
            raise RuntimeError(f"the watcher exited; see {watcher.log_path}")
        time.sleep(0.05)
        with session_scope(db_url) as session:
            queued = session.execute(sql_text(
                "SELECT count(*) FROM images WHERE status = 'queued'")).scalar_one()


def stack_settings(root: Path, base: Settings, cfg: BenchConfig) -> tuple[Settings, dict]:
    """Settings and child environment of a private stack under ``root``: its own data dir,
    SQLite file and Redis queue (on database ``cfg.redis_db``)."""
    broker = with_db(base.broker_url, cfg.redis_db)
    queue = f"cxr-bench-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(root / "var"),
        "CXR_DATABASE_URL": f"sqlite:///{root / 'var' / 'cxr.db'}",
        "CXR_BROKER_URL": broker,
        "CXR_QUEUE": queue,
        "CXR_BATCH_SIZE": str(cfg.batch_size),
        "CXR_MESSAGE_SIZE": str(cfg.message_size),
        "CXR_STABLE_SECONDS": str(cfg.stable_seconds),
        "CXR_WORKER_CONCURRENCY": "1",
        "CXR_LOG_LEVEL": "INFO",
        "CXR_HEATMAPS": "true" if cfg.heatmaps else "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        **cfg.extra_env,
    }
    for name in ("CXR_INBOX", "CXR_MODELS_DIR"):
        env.pop(name, None)
    settings = Settings(data_dir=root / "var", database_url=env["CXR_DATABASE_URL"],
                        broker_url=broker, queue=queue)
    return settings, env


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (the bench never uses the service's own)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def forget_queue(settings: Settings) -> None:
    """Delete the private queue's keys (other queues on that Redis db are left alone)."""
    try:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=1)
        keys = client.keys(f"*{settings.queue}*")
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:
        pass
