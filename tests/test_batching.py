"""Batched inference keeps the guarantees: the claim queries directly, the task logic in
process, and a real Celery worker that drains many queued images in batches on both backends.
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
from helpers_models import register_tiny_bundle
from helpers_pipeline import SHARED_REDIS, shared_redis, stop_process
from PIL import Image as PILImage
from sqlalchemy import func, select

from db import images
from db.models import Image, Prediction
from db.session import session_scope
from db.vocabulary import ImageStatus, Label
from worker.batch import process_image, run_batch
from worker.claims import holder_gone, holder_id
from worker.inference import ModelCache
from worker.intake import intake_file
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


def test_claim_queued_takes_untried_queued_rows_oldest_first(db_url):
    with session_scope(db_url) as session:
        queued = _add(session, 5)
        [tried] = _add(session, 1, attempts=1)
        [received] = _add(session, 1, ImageStatus.RECEIVED)
        [done] = _add(session, 1, ImageStatus.DONE)
    with session_scope(db_url) as session:
        first = images.claim_queued(session, 3, exclude=[queued[0]])
    assert [c.image_id for c in first] == queued[1:4]
    assert all(c.attempts == 1 and not c.gave_up for c in first)
    with session_scope(db_url) as session:
        rest = images.claim_queued(session, 10)
    assert [c.image_id for c in rest] == [queued[0], queued[4]]
    rows = _rows(db_url)
    assert all(rows[i] == (ImageStatus.PROCESSING, 1) for i in queued)
    assert rows[tried] == (ImageStatus.QUEUED, 1)  # left to its own task, run alone
    assert rows[received] == (ImageStatus.RECEIVED, 0)
    assert rows[done] == (ImageStatus.DONE, 0)
    with session_scope(db_url) as session:
        assert images.claim_queued(session, 0) == []
        assert images.release(session, queued[:2]) == 2
    assert _rows(db_url)[queued[0]] == (ImageStatus.QUEUED, 1)


def test_claim_free_answers_for_every_state(db_url):
    with session_scope(db_url) as session:
        [free] = _add(session, 1)
        [held] = _add(session, 1, ImageStatus.PROCESSING, attempts=1)
        [final] = _add(session, 1, ImageStatus.REJECTED)
        [spent] = _add(session, 1, ImageStatus.QUEUED, attempts=2)
    with session_scope(db_url) as session:
        claim = images.claim_free(session, free, max_attempts=2, holder="host-a:11")
        assert claim.image_id == free and claim.attempts == 1 and not claim.gave_up
        again = images.claim_free(session, free, max_attempts=2, holder="host-b:22")
        assert isinstance(again, images.Held) and again.holder == "host-a:11"
        assert 0 <= again.age_seconds() < 60
        assert images.claim_free(session, held, max_attempts=2) == images.Held(None, None)
        assert images.claim_free(session, final, max_attempts=2) is None
        assert images.claim_free(session, 10_000, max_attempts=2) is None
        assert images.claim_free(session, spent, max_attempts=2).gave_up
    rows = _rows(db_url)
    assert rows[held] == (ImageStatus.PROCESSING, 1)
    assert rows[spent] == (ImageStatus.FAILED, 3)


def test_concurrent_claims_never_share_a_row(db_url, backend):
    """Two workers claiming at once get disjoint rows (PostgreSQL: SKIP LOCKED, no waiting)."""
    with session_scope(db_url) as session:
        ids = _add(session, 12)
    if backend == "postgresql":
        with session_scope(db_url) as first:
            mine = images.claim_queued(first, 5)  # locks held, not committed yet
            with session_scope(db_url) as second:
                theirs = images.claim_queued(second, 12)
    else:
        results: list[list] = [[], [], []]

        def claim(k: int) -> None:
            with session_scope(db_url) as session:
                results[k] = images.claim_queued(session, 4)

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mine, theirs = results[0], results[1] + results[2]
    taken = [c.image_id for c in mine + theirs]
    assert len(taken) == len(set(taken)) > 0
    rows = _rows(db_url)
    assert {i for i in ids if rows[i] == (ImageStatus.PROCESSING, 1)} == set(taken)
    assert all(rows[i] == (ImageStatus.QUEUED, 0) for i in set(ids) - set(taken))
    if backend == "postgresql":  # skipped the locked rows instead of losing the race
        assert len(mine) == 5 and len(theirs) == 7


# --- the task logic in process ------------------------------------------------------------


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url, batch_wait_ms=0)
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


def test_one_delivery_classifies_a_batch_and_the_others_no_op(settings, caplog):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", bias=20.0)
    levels = {"a.png": 250, "b.png": 5, "c.png": 240, "bad.png": None, "d.png": 10, "e.png": 3}
    ids = {name: _drop(settings, name, level) for name, level in levels.items()}
    cache = ModelCache(settings.models_path)
    calls: list[int] = []
    with caplog.at_level("INFO", logger="worker.batch"):
        assert process_image(ids["a.png"], settings, cache, batch_size=5) == "done"
        bundle = cache._loaded["pneumonia"].bundle
        original = bundle.predict_proba
        bundle.predict_proba = lambda x: calls.append(len(x)) or original(x)
        assert [process_image(ids[n], settings, cache, batch_size=5) for n in levels] == [
            "noop", "noop", "noop", "noop", "noop", "done"]
    assert calls == [1]  # only e.png, which did not fit in the first batch
    assert [int(n) for n in BATCH_LINE.findall(caplog.text)] == [5, 1]
    with session_scope(settings.db_url) as session:
        rows = {i.file_name: i for i in session.scalars(select(Image))}
        labels = {n: (r.prediction.label if r.prediction else None) for n, r in rows.items()}
        assert session.scalar(select(func.count()).select_from(Prediction)) == 5
    assert labels == {"a.png": Label.VIRUS, "b.png": Label.NORMAL, "c.png": Label.VIRUS,
                      "bad.png": None, "d.png": Label.NORMAL, "e.png": Label.NORMAL}
    assert rows["bad.png"].status == ImageStatus.REJECTED and rows["bad.png"].error
    assert {r.attempts for r in rows.values()} == {1}


def test_a_failed_batch_hands_the_others_back(settings, monkeypatch):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    ids = [_drop(settings, f"{k}.png", 200) for k in range(3)]
    cache = ModelCache(settings.models_path)
    import worker.batch

    def boom(*_args, **_kwargs):
        raise RuntimeError("forward pass failed")

    monkeypatch.setattr(worker.batch, "classify_arrays", boom)
    with pytest.raises(RuntimeError):
        process_image(ids[0], settings, cache, batch_size=3)
    rows = _rows(settings.db_url)
    assert rows[ids[0]] == (ImageStatus.PROCESSING, 1)  # its task retries it
    assert rows[ids[1]] == rows[ids[2]] == (ImageStatus.QUEUED, 1)
    monkeypatch.undo()
    assert [process_image(i, settings, cache, batch_size=3) for i in ids] == ["done"] * 3
    assert {n for _, n in _rows(settings.db_url).values()} == {2}  # retried rows ran alone


def _claim_for(settings: Settings, image_id: int, holder: str) -> images.Claim:
    with session_scope(settings.db_url) as session:
        return images.claim_free(session, image_id, settings.max_attempts, holder)


def _count_predictions(settings: Settings) -> int:
    with session_scope(settings.db_url) as session:
        return session.scalar(select(func.count()).select_from(Prediction))


def test_a_task_waits_for_a_live_holder_instead_of_classifying_twice(settings):
    """Another worker's batch holds the image: its own task waits, then finds it done."""
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "held.png", 250)
    claim = _claim_for(settings, image_id, "another-host:4242")
    outcome: list[str] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(
            process_image(image_id, settings, ModelCache(settings.models_path), batch_size=1)
        )
    )
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and _count_predictions(settings) == 0
    holder_result = run_batch([claim], settings, ModelCache(settings.models_path))
    waiter.join(30)
    assert holder_result == {image_id: "done"} and outcome == ["noop"]
    assert _count_predictions(settings) == 1
    assert _rows(settings.db_url)[image_id] == (ImageStatus.DONE, 1)  # no second attempt


def test_a_holder_that_exited_on_this_host_is_taken_over_at_once(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "orphan.png", 250)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _claim_for(settings, image_id, f"{socket.gethostname()}:{gone.pid}")
    started = time.monotonic()
    assert process_image(image_id, settings, ModelCache(settings.models_path)) == "done"
    assert time.monotonic() - started < settings.claim_lease_seconds
    assert _rows(settings.db_url)[image_id] == (ImageStatus.DONE, 2)


def test_a_holder_past_its_lease_is_taken_over(settings):
    """A hung worker or a dead host: after the lease the image's own task classifies it."""
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "stuck.png", 250)
    _claim_for(settings, image_id, "host-that-died:77")
    short = settings.model_copy(update={"claim_lease_seconds": 0.5})
    assert holder_gone(images.Held("host-that-died:77", None), holder_id(), 600)
    assert not holder_gone(images.Held("host-that-died:77", datetime.now(UTC)), holder_id(), 600)
    assert process_image(image_id, short, ModelCache(settings.models_path)) == "done"
    assert _rows(settings.db_url)[image_id] == (ImageStatus.DONE, 2)


# --- a real worker ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_worker_drains_many_images_in_batches(settings, tmp_path):
    from worker.celery_app import CLASSIFY_TASK, make_app

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    db_number = random.randint(4, 15)
    client = shared_redis(db_number)
    queue = f"cxr-test-batch-{uuid.uuid4().hex[:8]}"
    broker = f"redis://{SHARED_REDIS}/{db_number}"
    app = make_app(Settings(broker_url=broker, queue=queue))

    def enqueue(image_id: int, file_name: str) -> None:
        app.send_task(CLASSIFY_TASK, args=[image_id], queue=queue,
                      argsrepr=f"(image_id={image_id}, file={file_name!r})", kwargsrepr="{}")

    n = 24
    expected = {}
    for k in range(n):  # all queued before the worker starts: batches must form
        level = 250 if k % 2 else 5
        path = settings.inbox_dir / f"many-{k}.png"
        img = PILImage.new("L", (40, 40), level)
        img.putpixel((0, 0), k)
        img.save(path)
        intake_file(path, settings, enqueue)
        expected[path.name] = Label.PNEUMONIA if level > 128 else Label.NORMAL
    env = {**os.environ, "CXR_DATA_DIR": str(settings.data_dir), "CXR_DATABASE_URL":
           settings.db_url, "CXR_BROKER_URL": broker, "CXR_QUEUE": queue, "CXR_BATCH_SIZE": "8",
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
        time.sleep(1.0)  # the last no-op deliveries
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
    assert sum(sizes) == n and max(sizes) > 1 and len(sizes) < n, sizes
    assert text.count("succeeded in") == n  # one Celery task per image, as Flower shows


def test_forward_passes_use_power_of_two_batches(tmp_path):
    import numpy as np
    from helpers_models import make_tiny_bundle

    from trainer.bundle import load_bundle
    from worker.inference import bucket_sizes, predict_in_buckets, warm_up

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
