"""Watcher pieces: the junk filter, the stat-only stability tracker, the inbox scan, and the
watch loop with a real observer (enqueue replaced by a recorder: the broker is tested in
test_pipeline)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from db import images
from db.models import Image
from db.session import session_scope
from db.vocabulary import ImageStatus
from worker.inbox.filters import is_candidate
from worker.inbox.intake import FIRST_BATCH
from worker.inbox.stability import StabilityTracker, file_signature
from worker.inbox.watcher import Watcher, scan_inbox
from worker.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "name",
    ["a.jpeg.part", "x.tmp", "dl.crdownload", "notes.txt~", ".DS_Store", ".hidden.png",
     "Thumbs.db", "f.PART", ""],
)
def test_junk_and_temp_names_are_skipped(name):
    assert not is_candidate(name)


@pytest.mark.parametrize("name", ["IM-0115-0001.jpeg", "scan.PNG", "person1_virus_6.jpeg", "x"])
def test_ordinary_names_are_candidates(name):
    assert is_candidate(name)


def test_tracker_waits_for_quiet_period(tmp_path):
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock=clock)
    path = tmp_path / "a.jpeg"
    path.write_bytes(b"x" * 10)
    tracker.touch(path)
    assert tracker.due() == []
    clock.now += 1.0
    with open(path, "ab") as fh:
        fh.write(b"more")
    assert tracker.due() == []  # growth restarts the quiet period
    clock.now += 1.9
    assert tracker.due() == []
    clock.now += 0.2
    assert tracker.due() == [path]
    assert tracker.due() == []  # handed out once
    assert path not in tracker


def test_tracker_close_event_is_due_at_once_unless_the_file_changes(tmp_path):
    clock = FakeClock()
    tracker = StabilityTracker(60.0, clock=clock)
    closed, reopened = tmp_path / "closed.png", tmp_path / "reopened.png"
    closed.write_bytes(b"a")
    reopened.write_bytes(b"b")
    tracker.touch(closed, closed=True)
    tracker.touch(reopened, closed=True)
    with open(reopened, "ab") as fh:
        fh.write(b"appended after close")
    assert tracker.due() == [closed]
    assert reopened in tracker


def test_tracker_drops_vanished_files(tmp_path):
    tracker = StabilityTracker(0.0, clock=FakeClock())
    path = tmp_path / "gone.jpeg"
    path.write_bytes(b"x")
    tracker.touch(path)
    path.unlink()
    assert tracker.due() == []
    assert len(tracker) == 0
    tracker.touch(tmp_path / "never-existed.jpeg")
    assert len(tracker) == 0


def test_file_signature_ignores_directories_and_fifos(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert file_signature(tmp_path / "fifo") is None
    assert file_signature(tmp_path) is None


def test_scan_finds_nested_candidates_and_marks_old_files_complete(tmp_path):
    (tmp_path / "sub").mkdir()
    old, new = tmp_path / "sub" / "old.jpeg", tmp_path / "new.jpeg"
    old.write_bytes(b"1")
    new.write_bytes(b"2")
    (tmp_path / "skip.part").write_bytes(b"3")
    os.utime(old, (time.time() - 100, time.time() - 100))
    found = dict(scan_inbox(tmp_path, quiet_seconds=5.0))
    assert found == {old: True, new: False}


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=db_url, stable_seconds=0.3,
                    rescan_seconds=0.5)


def _wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _rows(url: str) -> list[Image]:
    with session_scope(url) as session:
        return list(session.query(Image).order_by(Image.id))


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watch_loop_takes_complete_files_once(settings, polling):
    sent: list[tuple[int, str]] = []
    settings.ensure_dirs()
    inbox = settings.inbox_dir
    (inbox / "before.jpeg").write_bytes(b"present at start-up")
    watcher = Watcher(settings, enqueue=sent.extend, polling=polling)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        (inbox / "nested").mkdir()
        with open(inbox / "nested" / "slow.png", "wb") as fh:  # one open file, written in chunks
            for _ in range(4):
                fh.write(os.urandom(1000))
                fh.flush()
                time.sleep(0.1)
        (inbox / "ignored.part").write_bytes(b"partial")
        _wait_for(lambda: len(sent) >= 2)
        time.sleep(1.2)  # two more reconcile passes must not take anything twice
    finally:
        stop.set()
        thread.join(10)
    rows = _rows(settings.db_url)
    assert sorted(r.file_name for r in rows) == ["before.jpeg", "nested/slow.png"]
    assert {r.status for r in rows} == {ImageStatus.QUEUED}
    assert sorted(name for _, name in sent) == ["before.jpeg", "nested/slow.png"]
    slow = next(r for r in rows if r.file_name == "nested/slow.png")
    assert slow.size_bytes == 4000
    assert (inbox / "ignored.part").exists()
    assert not (inbox / "before.jpeg").exists()


def test_a_file_renamed_into_the_inbox_is_complete_at_once(settings, tmp_path):
    """A rename is atomic: a file written elsewhere and moved in (what exports do) is taken on
    its event, not after the quiet period (30 s here); one moved out is simply gone."""
    settings = settings.model_copy(update={"stable_seconds": 30.0, "rescan_seconds": 60.0})
    settings.ensure_dirs()
    outside = tmp_path / "export"
    outside.mkdir()
    sent: list[tuple[int, str]] = []
    watcher = Watcher(settings, enqueue=sent.extend)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the start-up scan is over: only the events can find these files
        (outside / "moved.jpeg").write_bytes(b"written elsewhere, renamed in")
        (settings.inbox_dir / "leaving.jpeg.part").write_bytes(b"partial")
        os.rename(outside / "moved.jpeg", settings.inbox_dir / "moved.jpeg")
        os.rename(settings.inbox_dir / "leaving.jpeg.part", outside / "left.jpeg")
        _wait_for(lambda: sent, timeout=10.0)
    finally:
        stop.set()
        thread.join(10)
    assert [name for _, name in sent] == ["moved.jpeg"]
    assert not (settings.inbox_dir / "moved.jpeg").exists()


def test_a_burst_into_an_idle_watcher_sends_a_small_first_message(settings, tmp_path):
    """The first message of a burst holds ``FIRST_BATCH`` files, so an idle worker starts on
    them while the watcher still hashes the rest; the next ones are whole batches."""
    settings = settings.model_copy(update={"stable_seconds": 30.0, "rescan_seconds": 60.0})
    settings.ensure_dirs()
    staged = tmp_path / "export"
    staged.mkdir()
    for k in range(FIRST_BATCH + 40):
        (staged / f"f{k:03d}.png").write_bytes(f"content {k}".encode())
    messages: list[int] = []
    watcher = Watcher(settings, enqueue=lambda batch: messages.append(len(batch)))
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the start-up scan is over: the watcher is idle
        for path in sorted(staged.iterdir()):
            os.rename(path, settings.inbox_dir / path.name)
        _wait_for(lambda: sum(messages) == FIRST_BATCH + 40, timeout=10.0)
    finally:
        stop.set()
        thread.join(10)
    assert messages[0] <= FIRST_BATCH < max(messages)  # a whole burst at once would be 56


def test_a_turn_that_took_files_says_so_and_the_next_turn_does_not_wait(settings):
    """The loop only waits for events (and then for the rest of a burst) after a turn that
    took nothing; a turn that took files must say so, or every turn of a burst waits."""
    settings.ensure_dirs()
    sent: list[tuple[int, str]] = []
    watcher = Watcher(settings, enqueue=sent.extend)
    path = settings.inbox_dir / "a.png"
    path.write_bytes(b"one file")
    watcher.tracker.touch(path, closed=True)
    assert watcher._take_due() is True and len(sent) == 1
    assert watcher._take_due() is False


def test_watch_loop_survives_a_broker_outage(settings):
    attempts: list[int] = []
    broker_up = threading.Event()

    def flaky_enqueue(batch) -> None:
        attempts.extend(image_id for image_id, _ in batch)
        if not broker_up.is_set():
            raise ConnectionError("broker down")

    settings.ensure_dirs()
    watcher = Watcher(settings, enqueue=flaky_enqueue)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        (settings.inbox_dir / "a.jpeg").write_bytes(b"a")
        _wait_for(lambda: attempts)
        assert [r.status for r in _rows(settings.db_url)] == [ImageStatus.RECEIVED]
        (settings.inbox_dir / "b.jpeg").write_bytes(b"b")
        _wait_for(lambda: len(_rows(settings.db_url)) == 2)
        broker_up.set()
        with session_scope(settings.db_url) as session:  # make the rows look stale
            session.query(Image).update({Image.received_at: images.stale_cutoff(60)})
        _wait_for(lambda: {r.status for r in _rows(settings.db_url)} == {ImageStatus.QUEUED})
    finally:
        stop.set()
        thread.join(10)
    assert thread.is_alive() is False


def test_symlink_out_of_the_inbox_is_rejected_not_followed(settings, tmp_path):
    secret = tmp_path / "secret.jpeg"
    secret.write_bytes(b"outside")
    settings.ensure_dirs()
    (settings.inbox_dir / "link.jpeg").symlink_to(secret)
    watcher = Watcher(settings, enqueue=lambda *_: pytest.fail("a link must not be enqueued"))
    watcher.reconcile_once()
    _wait_for(lambda: (watcher._take_due(), watcher.taken)[1])
    [row] = _rows(settings.db_url)
    assert row.status == ImageStatus.REJECTED
    assert "symbolic link" in row.error
    assert secret.read_bytes() == b"outside"
    assert not (settings.inbox_dir / "link.jpeg").exists()
    assert not any(Path(settings.archive_dir).rglob("*.jpeg"))


def test_database_outage_logs_one_line_per_pass_and_keeps_every_file(tmp_path, caplog):
    """Nothing listens on port 1: every intake would fail alike, so one warning, no tracebacks."""
    settings = Settings(data_dir=tmp_path / "var", stable_seconds=0.0,
                        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    settings.ensure_dirs()
    names = [f"scan-{i}.jpeg" for i in range(3)]
    for name in names:
        (settings.inbox_dir / name).write_bytes(name.encode())
    watcher = Watcher(settings, enqueue=lambda *_: pytest.fail("nothing is recorded"))
    watcher.reconcile_once()
    caplog.clear()
    with caplog.at_level("WARNING", logger="worker.inbox.watcher"):
        watcher._take_due()
    warnings = [r for r in caplog.records if r.name == "worker.inbox.watcher"]
    assert len(warnings) == 1 and "database unreachable" in warnings[0].getMessage()
    assert "3 file(s) stay in the inbox" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    assert sorted(p.name for p in settings.inbox_dir.iterdir()) == names
    assert watcher.taken == 0


def test_a_look_at_a_dead_broker_gives_up_after_one_quick_retry(monkeypatch):
    """The reconcile pass reads the queue from the watcher's loop: against a broker that hangs
    up on every connection it must fail after two tries, not retry for seconds (kombu's
    default) while new files wait."""
    import socket

    import worker.classify.broker as broker
    from worker.classify.celery_app import make_app

    accepted = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setattr(broker, "app", make_app(Settings(broker_url=f"redis://127.0.0.1:{port}/0")))
    try:
        for look in (broker.queue_is_empty, lambda: broker.ids_on_their_way("d")):
            before = len(accepted)
            with pytest.raises(Exception, match="(?i)connect|closed"):
                look()
            assert 1 <= len(accepted) - before <= 2
    finally:
        listener.close()
