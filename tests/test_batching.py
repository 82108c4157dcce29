"""Batched inference keeps the guarantees: the claim queries directly, the task logic in
process, and a real Celery worker that drains messages of several images on both backends.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers_data import intake_file
from helpers_models import register_tiny_bundle
from helpers_pipeline import SHARED_REDIS, shared_redis, stop_process
from PIL import Image as PILImage
from sqlalchemy import func, select

from db import claims as claim_db
from db import images
from db.models import Image, Prediction
from db.session import session_scope
from db.vocabulary import ImageStatus, Label
from worker.classify.batch import classify_claimed, process_images
from worker.classify.claiming import LiveHosts, holder_gone, holder_id
from worker.classify.inference import ModelCache
from worker.inbox.intake import intake_files
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BATCH_LINE = re.compile(r"batch of (\d+):")


def _add(session, n: int, status: ImageStatus = ImageStatus.QUEUED, attempts: int = 0) -> list[int]:
    ids = []
    for _ in range(n):
        row = images.record_image(session, sha256=uuid.uuid4().hex * 2, file_name="x.png",
                                  stored_path=None, size_bytes=1, status=status)
        row.attempts = attempts
        ids.append(row.id)
    session.flush()
    return ids


def _rows(db_url: str) -> dict[int, tuple[str, int]]:
    with session_scope(db_url) as session:
        return {i.id: (i.status, i.attempts) for i in session.scalars(select(Image))}


def test_claim_free_takes_every_free_row_in_one_update(db_url):
    with session_scope(db_url) as session:
        free = _add(session, 3)
        [held] = _add(session, 1, ImageStatus.PROCESSING, attempts=1)
        [final] = _add(session, 1, ImageStatus.DONE, attempts=1)
        [spent] = _add(session, 1, ImageStatus.QUEUED, attempts=2)
    ids = [*free, held, final, spent, 10_000]
    with session_scope(db_url) as session:
        claims, found_held = claim_db.claim_free(session, ids, max_attempts=2, holder="host-a:11",
                                               task_id="task-1")
        assert [c.image_id for c in claims] == free and {c.attempts for c in claims} == {1}
        assert [h.image_id for h in found_held] == [held]
        assert claim_db.unclaimable(session, ids) == [spent]
        assert claim_db.claim(session, spent, max_attempts=2).gave_up
    with session_scope(db_url) as session:
        again, found_held = claim_db.claim_free(session, free, max_attempts=2, holder="host-b:22")
        assert again == [] and [h.holder for h in found_held] == ["host-a:11"] * 3
        rows = {i.id: i for i in session.scalars(select(Image))}
    assert {rows[i].task_id for i in free} == {"task-1"}
    assert (rows[spent].status, rows[final].status) == (ImageStatus.FAILED, ImageStatus.DONE)


def test_concurrent_claims_never_share_a_row(db_url, backend):
    """Two deliveries naming overlapping images take disjoint rows: the UPDATE's condition is
    re-checked under the row lock (PostgreSQL) or the single writer (SQLite)."""
    with session_scope(db_url) as session:
        ids = _add(session, 12)
    results: list[list] = [[], [], []]
    barrier = threading.Barrier(3)

    def claim(k: int) -> None:
        barrier.wait()
        with session_scope(db_url) as session:
            results[k] = claim_db.claim_free(session, ids[k * 3:k * 3 + 8], 3, f"h:{k}")[0]

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [c.image_id for r in results for c in r]
    assert len(taken) == len(set(taken)) == len(ids)
    assert all(v == (ImageStatus.PROCESSING, 1) for v in _rows(db_url).values())


# --- the task logic in process ------------------------------------------------------------


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url)
    s.ensure_dirs()
    return s


def _drop(settings: Settings, name: str, level: int | None) -> int:
    path = settings.inbox_dir / name
    if level is None:
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    else:
        img = PILImage.new("L", (40, 40), level)
        img.putpixel((0, 0), random.randrange(256))
        img.putpixel((1, 0), random.randrange(256))
        img.save(path)
    return intake_file(path, settings, lambda *_: None).image_id


def test_one_message_classifies_its_images_together(settings, caplog):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", bias=20.0)
    levels = {"a.png": 250, "b.png": 5, "c.png": 240, "bad.png": None, "d.png": 10}
    ids = {name: _drop(settings, name, level) for name, level in levels.items()}
    cache = ModelCache(settings.models_path)
    with caplog.at_level("INFO", logger="worker.classify.batch"):
        outcome = process_images(ids.values(), settings, cache, task_id="t-1")
    assert outcome == {ids[n]: ("rejected" if n == "bad.png" else "done") for n in levels}
    assert [int(n) for n in BATCH_LINE.findall(caplog.text)] == [5]
    assert process_images(ids.values(), settings, cache) == {}  # a redelivery does nothing
    with session_scope(settings.db_url) as session:
        rows = {i.file_name: i for i in session.scalars(select(Image))}
        labels = {n: (r.prediction.label if r.prediction else None) for n, r in rows.items()}
        assert session.scalar(select(func.count()).select_from(Prediction)) == 4
    assert labels == {"a.png": Label.VIRUS, "b.png": Label.NORMAL, "c.png": Label.VIRUS,
                      "bad.png": None, "d.png": Label.NORMAL}
    assert rows["bad.png"].status == ImageStatus.REJECTED and rows["bad.png"].error
    assert {r.attempts for r in rows.values()} == {1} and {r.task_id for r in rows.values()} == {
        "t-1"}


def test_a_message_is_classified_in_forward_passes_while_the_rest_decodes(settings, monkeypatch):
    """A message of 10 with CXR_BATCH_SIZE 4: passes of 4, 4 and 2, in order, and the decoding
    threads go on while the model runs (the first pass waits here until every image of the
    message is decoded, which would never happen if decoding waited for the model)."""
    from worker.classify import batch

    settings = settings.model_copy(update={"batch_size": 4})
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    levels = [250 if k % 3 else 5 for k in range(10)]
    ids = [_drop(settings, f"m{k}.png", level) for k, level in enumerate(levels)]
    decoded, passes = [], []
    real_read, real_classify = batch.read_claim, batch.classify_arrays

    def counting_read(*args):
        result = real_read(*args)
        decoded.append(result.claim.image_id)
        return result

    def watching_classify(pixels, *args):
        if not passes:
            deadline = time.monotonic() + 30
            while len(decoded) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(decoded) == len(ids), "decoding stopped while the model ran"
        passes.append(len(pixels))
        return real_classify(pixels, *args)

    monkeypatch.setattr(batch, "read_claim", counting_read)
    monkeypatch.setattr(batch, "classify_arrays", watching_classify)
    assert process_images(ids, settings, ModelCache(settings.models_path)) == dict.fromkeys(
        ids, "done")
    assert passes == [4, 4, 2]
    labels = {r.file_name: r.prediction.label for r in _images(settings.db_url)}
    assert labels == {f"m{k}.png": Label.PNEUMONIA if level > 128 else Label.NORMAL
                      for k, level in enumerate(levels)}


def _images(db_url: str) -> list[Image]:
    with session_scope(db_url) as session:
        rows = list(session.scalars(select(Image)))
        for row in rows:
            _ = row.prediction
        return rows


def test_a_failed_batch_is_retried_and_a_redelivery_runs_each_image_alone(settings, monkeypatch):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    ids = [_drop(settings, f"{k}.png", 200) for k in range(3)]
    cache = ModelCache(settings.models_path)
    import worker.classify.batch

    def boom(*_args, **_kwargs):
        raise RuntimeError("forward pass failed")

    monkeypatch.setattr(worker.classify.batch, "classify_arrays", boom)
    with pytest.raises(RuntimeError):
        process_images(ids, settings, cache)
    assert set(_rows(settings.db_url).values()) == {(ImageStatus.PROCESSING, 1)}
    monkeypatch.undo()
    sizes: list[int] = []
    real = worker.classify.batch.classify_arrays
    monkeypatch.setattr(worker.classify.batch, "classify_arrays",
                        lambda batch, *a: sizes.append(len(batch)) or real(batch, *a))
    assert process_images(ids, settings, cache) == dict.fromkeys(ids, "done")
    assert sizes == [1, 1, 1]  # taken over from this very process, one at a time
    assert set(_rows(settings.db_url).values()) == {(ImageStatus.DONE, 2)}


def test_an_image_that_keeps_failing_ends_failed_with_the_error(settings, monkeypatch):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "poison.png", 200)
    import worker.classify.batch

    monkeypatch.setattr(worker.classify.batch, "classify_arrays",
                        lambda *a: (_ for _ in ()).throw(ValueError("bad tensor")))
    cache = ModelCache(settings.models_path)
    for _ in range(settings.max_attempts - 1):
        with pytest.raises(ValueError):
            process_images([image_id], settings, cache)
    assert process_images([image_id], settings, cache) == {image_id: "failed"}
    with session_scope(settings.db_url) as session:
        row = session.get(Image, image_id)
        assert (row.status, row.attempts) == (ImageStatus.FAILED, settings.max_attempts)
        assert "bad tensor" in row.error


def _claim_for(settings: Settings, image_id: int, holder: str) -> claim_db.Claim:
    with session_scope(settings.db_url) as session:
        [claim], _ = claim_db.claim_free(session, [image_id], settings.max_attempts, holder)
        return claim


def _count_predictions(settings: Settings) -> int:
    with session_scope(settings.db_url) as session:
        return session.scalar(select(func.count()).select_from(Prediction))


def test_a_duplicate_message_leaves_an_image_to_its_live_holder(settings):
    """The reconcile pass may re-send a message whose first copy is being worked on: the
    duplicate leaves the held image alone, and the holder finishes it, once."""
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "held.png", 250)
    other = _drop(settings, "free.png", 5)
    claim = _claim_for(settings, image_id, "another-host:4242")
    cache = ModelCache(settings.models_path)
    assert process_images([image_id, other], settings, cache) == {image_id: "held", other: "done"}
    assert _count_predictions(settings) == 1
    assert classify_claimed([claim], settings, cache) == {image_id: "done"}
    assert _count_predictions(settings) == 2
    assert _rows(settings.db_url)[image_id] == (ImageStatus.DONE, 1)  # no second attempt


def test_a_holder_that_exited_on_this_host_is_taken_over_at_once(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "orphan.png", 250)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _claim_for(settings, image_id, f"{socket.gethostname()}:{gone.pid}")
    outcome = process_images([image_id], settings, ModelCache(settings.models_path))
    assert outcome == {image_id: "done"}
    assert _rows(settings.db_url)[image_id] == (ImageStatus.DONE, 2)


def test_a_reused_pid_is_not_mistaken_for_the_holder():
    """A restarted container gives a new process the dead holder's pid: its start time differs."""
    me = holder_id()
    host, pid, start = me.split(":")
    assert int(pid) == os.getpid() and start.isdigit()
    now = datetime.now(UTC)
    impostor = f"{host}:{pid}:{int(start) + 1}"
    assert holder_gone(claim_db.Held(1, impostor, now), "someone-else:1", 600)
    assert not holder_gone(claim_db.Held(1, me, now), "someone-else:1", 600)


def test_a_holder_past_its_lease_or_on_a_silent_host_is_taken_over(settings):
    """A hung worker or a dead host: after the lease, or at once when Celery's heartbeat
    (a ping) shows no worker on that host any more."""
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    stuck = _drop(settings, "stuck.png", 250)
    elsewhere = _drop(settings, "elsewhere.png", 250)
    _claim_for(settings, stuck, "host-that-hangs:77")
    _claim_for(settings, elsewhere, "host-that-died:78")
    now = datetime.now(UTC)
    assert holder_gone(claim_db.Held(1, "host-that-died:77", None), holder_id(), 600)
    assert not holder_gone(claim_db.Held(1, "host-that-died:77", now), holder_id(), 600)
    me = socket.gethostname()
    only_me = LiveHosts(ping=lambda: [f"celery@{me}"])
    both = LiveHosts(ping=lambda: [f"celery@{me}", "celery@host-that-died",
                                   "celery@host-that-hangs"])
    nobody = LiveHosts(ping=lambda: [])
    held = claim_db.Held(1, "host-that-died:78", now)
    assert holder_gone(held, holder_id(), 600, only_me)
    assert not holder_gone(held, holder_id(), 600, both)
    assert not holder_gone(held, holder_id(), 600, nobody)  # no answer proves nothing
    cache = ModelCache(settings.models_path)
    assert process_images([stuck, elsewhere], settings, cache, live_hosts=both) == {
        stuck: "held", elsewhere: "held"}
    assert process_images([elsewhere], settings, cache, live_hosts=only_me) == {
        elsewhere: "done"}
    short = settings.model_copy(update={"claim_lease_seconds": 0.0})
    assert process_images([stuck], short, cache, live_hosts=both) == {stuck: "done"}


def test_the_worker_decodes_what_intake_hashed(settings):
    """An archived file rewritten after intake is refused, not classified under the old hash
    (a later genuine copy would otherwise inherit a wrong label)."""
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "IM-1.png", 250)
    with session_scope(settings.db_url) as session:
        stored = settings.data_dir / session.get(Image, image_id).stored_path
    PILImage.new("L", (40, 40), 3).save(stored)
    outcome = process_images([image_id], settings, ModelCache(settings.models_path))
    assert outcome == {image_id: "rejected"} and _count_predictions(settings) == 0
    with session_scope(settings.db_url) as session:
        assert "changed after intake" in session.get(Image, image_id).error


def test_a_missing_archived_file_is_retried_then_failed(settings, monkeypatch):
    """An NFS blip: the file comes back and the image is classified; gone for good, the image
    fails once its attempts are used, never a final ``rejected`` on the first miss."""
    import worker.classify.broker

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    blip = _drop(settings, "blip.png", 250)
    gone = _drop(settings, "gone.png", 5)
    resent: list = []
    monkeypatch.setattr(worker.classify.broker, "enqueue_batch",
                        lambda batch, countdown=None: resent.append((list(batch), countdown)))
    with session_scope(settings.db_url) as session:
        paths = {i: settings.data_dir / session.get(Image, i).stored_path for i in (blip, gone)}
    hidden = paths[blip].with_suffix(".away")
    paths[blip].rename(hidden)
    paths[gone].unlink()
    cache = ModelCache(settings.models_path)
    assert process_images([blip, gone], settings, cache) == {blip: "retry", gone: "retry"}
    assert [ids for ids, _ in resent] == [[(blip, "blip.png")], [(gone, "gone.png")]]
    assert all(countdown and countdown > 0 for _, countdown in resent)
    hidden.rename(paths[blip])
    assert process_images([blip], settings, cache) == {blip: "done"}
    for _ in range(settings.max_attempts - 2):
        assert process_images([gone], settings, cache) == {gone: "retry"}
    assert process_images([gone], settings, cache) == {gone: "failed"}
    with session_scope(settings.db_url) as session:
        assert "archived file is missing (gave up after 3 attempts)" in session.get(
            Image, gone).error


def test_decoding_waits_for_the_memory_budget():
    """Large decodes never all run at once: the budget admits them one by one."""
    from trainer.imaging.budget import MemoryBudget

    budget = MemoryBudget(100)
    peak, lock = [0], threading.Lock()

    def decode(cost: int) -> None:
        with budget.reserve(cost):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.05)

    threads = [threading.Thread(target=decode, args=(60,)) for _ in range(4)]
    threads.append(threading.Thread(target=decode, args=(500,)))  # bigger than all: runs alone
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.in_use == 0


def test_a_16_bit_png_costs_what_its_header_says(tmp_path):
    import numpy as np

    from trainer.imaging.budget import decode_cost
    from trainer.imaging.decode import decode_image

    path = tmp_path / "deep.png"
    PILImage.fromarray(np.linspace(0, 4095, 300 * 200, dtype=np.uint16).reshape(200, 300)).save(
        path)
    assert decode_cost(path.read_bytes()[:64], 32) == 300 * 200 * 9
    pixels = decode_image(path, 32, 10**8)
    assert pixels.dtype == np.uint8 and pixels.min() <= 5 and pixels.max() >= 250


# --- a real worker ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_worker_classifies_a_message_of_images_at_a_time(settings, tmp_path):
    from worker.classify.celery_app import CLASSIFY_TASK, make_app

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    db_number = random.randint(4, 15)
    client = shared_redis(db_number)
    queue = f"cxr-test-batch-{uuid.uuid4().hex[:8]}"
    broker = f"redis://{SHARED_REDIS}/{db_number}"
    app = make_app(Settings(broker_url=broker, queue=queue))

    def enqueue(batch) -> None:
        app.send_task(CLASSIFY_TASK, args=[[i for i, _ in batch]], queue=queue,
                      argsrepr=repr(batch), kwargsrepr="{}")

    n = 24
    expected = {}
    paths = []
    for k in range(n):
        level = 250 if k % 2 else 5
        path = settings.inbox_dir / f"many-{k}.png"
        img = PILImage.new("L", (40, 40), level)
        img.putpixel((0, 0), k)
        img.save(path)
        paths.append(path)
        expected[path.name] = Label.PNEUMONIA if level > 128 else Label.NORMAL
    intake_files(paths, settings.model_copy(update={"message_size": 8}), enqueue)
    env = {**os.environ, "CXR_DATA_DIR": str(settings.data_dir), "CXR_DATABASE_URL":
           settings.db_url, "CXR_BROKER_URL": broker, "CXR_QUEUE": queue, "CXR_BATCH_SIZE": "8",
           "CXR_MESSAGE_SIZE": "8",
           "CXR_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "prefork",
             "-c", "1", "-Q", queue, "--without-mingle", "--without-gossip", "-l", "INFO"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            statuses = {s for s, _ in _rows(settings.db_url).values()}
            if statuses == {ImageStatus.DONE} and client.llen(queue) == 0:
                break
            assert worker.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.3)
        else:
            raise AssertionError(log_path.read_text()[-3000:])
    finally:
        stop_process(worker, timeout=30)
        client.delete(queue, *client.keys(f"*{queue}*"))
        client.close()
    text = log_path.read_text()
    sizes = [int(s) for s in BATCH_LINE.findall(text)]
    with session_scope(settings.db_url) as session:
        rows = {i.file_name: i for i in session.scalars(select(Image))}
        labels = {name: row.prediction.label for name, row in rows.items()}
        per_content = session.execute(
            select(Prediction.sha256, func.count()).group_by(Prediction.sha256)).all()
    assert labels == expected
    assert len(per_content) == n and {count for _, count in per_content} == {1}
    assert {row.attempts for row in rows.values()} == {1}
    assert sizes == [8, 8, 8], sizes
    assert text.count("succeeded in") == 3  # one Celery task per message of 8 images
    assert len({row.task_id for row in rows.values()}) == 3


def test_forward_passes_use_power_of_two_batches(tmp_path):
    import numpy as np
    from helpers_models import make_tiny_bundle

    from trainer.model.bundle import load_bundle
    from worker.classify.inference import bucket_sizes, predict_in_buckets, warm_up

    assert bucket_sizes(13) == [8, 4, 1] and bucket_sizes(16) == [16] and bucket_sizes(0) == []
    bundle = load_bundle(make_tiny_bundle(tmp_path, "pneumonia", 1))
    batch = np.stack([np.full((32, 32, 3), 20 * k, dtype=np.uint8) for k in range(13)])
    whole = bundle.predict_proba(batch)
    seen: list[int] = []
    original = bundle.predict_proba
    bundle.predict_proba = lambda x: seen.append(len(x)) or original(x)
    np.testing.assert_allclose(predict_in_buckets(bundle, batch), whole, rtol=1e-6)
    assert seen == [8, 4, 1]
    seen.clear()
    assert warm_up(bundle, 5) == [1, 2, 4] and seen == [1, 2, 4]
    assert warm_up(bundle, 16, budget_s=0.0) == []
