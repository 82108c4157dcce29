"""``cxr bench --dicom N``: N synthetic chest DICOMs sent with dcmtk's ``storescu`` over
loopback, split over K associations at once (K storescu processes, as a PACS sends with
several threads; K=1 shows one association's round trip), to ``cxr dicom listen`` beside
``cxr watch`` (a private data dir, SQLite file and Redis queue; no worker, so the clock
measures the way in), timed until storescu is answered for every instance and until every
row is recorded (queued)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.ops.bench_inputs import BenchConfig, Progress
from worker.ops.bench_service import forget_queue, stack_settings
from worker.ops.stack import LocalStack
from worker.settings import Settings


def write_instances(folder: Path, n: int, side: int) -> list[Path]:
    """N distinct DX instances of ``side`` x ``side`` 8-bit pixels (about side² bytes each)."""
    from trainer.synth.dicom_writer import VARIANTS, synthetic_dataset, write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (side, side), dtype=np.uint8)
    variant = next(v for v in VARIANTS if v.bits_stored == 8 and v.photometric == "MONOCHROME2"
                   and str(v.transfer_syntax) == "1.2.840.10008.1.2.1")
    return [write_dicom(synthetic_dataset(gray, variant, patient=f"BENCH{i}", accession=f"B{i}",
                                          seed=1, index=i), folder / f"{i:06d}.dcm")
            for i in range(n)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recorded(db_url: str) -> int:
    from sqlalchemy import text

    from db.session import session_scope

    with session_scope(db_url) as session:
        return int(session.execute(text("SELECT count(*) FROM images WHERE status = 'queued'"))
                   .scalar_one())


def _storescu(port: int, files: list[Path], associations: int) -> float:
    """Seconds until every one of ``associations`` storescu runs is answered."""
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", "CXR", "127.0.0.1", str(port),
                               *map(str, files[i::associations])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(associations)]
    failed = [p.stderr.read()[-300:] for p in procs if p.wait() != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0]}")
    return time.perf_counter() - started


def run_dicom_bench(n: int, base: Settings, *, associations: int = 4, side: int = 512,
                    redis_db: int = 12, work_dir: Path | None = None,
                    progress: Progress = print) -> dict[str, Any]:
    if not shutil.which("storescu"):
        raise RuntimeError("storescu (dcmtk) is not installed: apt-get install dcmtk")
    root = Path(work_dir or tempfile.mkdtemp(prefix="cxr-bench-dicom-"))
    port = _free_port()
    settings, env = stack_settings(root, base, BenchConfig(redis_db=redis_db, images=n))
    env.update({"CXR_DICOM_PORT": str(port), "CXR_DICOM_ADDRESS": "127.0.0.1"})
    settings.ensure_dirs()
    from db.migrate import upgrade

    upgrade(settings.db_url)
    files = write_instances(root / "instances", n, side)
    progress(f"dicom: {n} instances of {files[0].stat().st_size} bytes")
    watcher = LocalStack(env, root / "watcher.log", command="watch")
    listener = LocalStack(env, root / "listener.log", "listen", command="dicom")
    try:
        watcher.wait_for_log("watching")
        listener.wait_for_log("DICOM listener")
        started = time.perf_counter()
        stored = _storescu(port, files, associations)
        while _recorded(settings.db_url) < n:
            if not (watcher.running() and listener.running()):
                raise RuntimeError(f"the watcher or listener exited; see {root}")
            time.sleep(0.05)
        recorded = time.perf_counter() - started
    finally:
        listener.stop(timeout=30)
        watcher.stop(timeout=30)
        forget_queue(settings)
    result = {"instances": n, "associations": associations, "bytes_each": files[0].stat().st_size,
              "stored_per_s": n / stored, "recorded_per_s": n / recorded,
              "stored_s": stored, "recorded_s": recorded, "work_dir": str(root)}
    progress(f"  {associations} association(s): storescu answered for all in {stored:.2f} s "
             f"({n / stored:.0f} instances/s); all rows recorded after {recorded:.2f} s "
             f"({n / recorded:.0f} instances/s)")
    return result
