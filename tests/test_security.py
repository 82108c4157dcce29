"""Security with real processes: a password-protected Redis, JSON-only messages (a pickle is
refused, never unpickled), no patient data in messages or logs beyond image id and file name,
nothing outside the inbox read or moved, private archive and rejected files.

Flower's basic auth is proved in tests/test_flower.py (a real Flower answering 401 without
credentials), not repeated here.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers_models import register_tiny_bundle
from helpers_pipeline import drop, pipeline_session, png_bytes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PASSWORD = "s3cret/pw:with@odd#chars"


class _Unpickled:
    """Unpickling this creates ``path``: proof that a worker ran code from a message."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _monitor(redis_server, sink: list[str], stop: threading.Event) -> threading.Thread:
    """Record every command the Redis server sees (what a network observer could read)."""

    def run():
        client = redis_server.client()
        with client.monitor() as monitor:
            for command in monitor.listen():
                sink.append(command["command"])
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_password_redis_json_only_and_no_patient_data_leaks(tmp_path):
    with pipeline_session(tmp_path / "p", redis_password=PASSWORD) as p:
        traffic: list[str] = []
        stop = threading.Event()
        monitor = _monitor(p.redis, traffic, stop)
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        files = {"Doe^Jane/IM-0001.png": png_bytes(245), "Doe^Jane/IM-0002.png": png_bytes(10),
                 "broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64}
        for name, data in files.items():
            drop(p.inbox, name, data)
        rows = p.wait_final(list(files))
        assert [rows[n]["status"] for n in files] == ["done", "done", "rejected"]

        # JSON only: a pickled message is refused and its payload never runs
        from worker.classify.celery_app import CLASSIFY_TASK, make_app
        from worker.settings import Settings

        marker = tmp_path / "unpickled"
        app = make_app(Settings(broker_url=p.redis.url(1), queue=p.env["CXR_QUEUE"]))
        app.send_task(CLASSIFY_TASK, args=[_Unpickled(marker)], serializer="pickle",
                      queue=p.env["CXR_QUEUE"])
        wait_until(lambda: "untrusted content of type pickle" in p.log("worker"), 30,
                   "the worker to refuse the pickle")
        drop(p.inbox, "after-pickle.png", png_bytes(245))
        assert p.wait_final(["after-pickle.png"])["after-pickle.png"]["label"] == "PNEUMONIA"
        assert not marker.exists()
        assert p.alive()
        stop.set()
        p.redis.client().ping()  # wakes the monitor so it sees ``stop``
        monitor.join(timeout=5)

        logs = p.log("worker") + p.log("watcher")
        for secret in (PASSWORD, quote(PASSWORD, safe="")):  # the URL carries it encoded
            assert secret not in logs and secret not in " ".join(traffic)
        messages = "\n".join(t for t in traffic if "cxr.classify_images" in t)
        assert messages.count("cxr.classify_images") >= 1
        for name, data in files.items():
            full = str(p.inbox / name)
            assert full not in logs and full not in messages, name
            assert base64.b64encode(data[:48]).decode() not in messages
        assert str(tmp_path) not in messages
        assert "IM-0001.png" in messages  # the file name (and image id) is all a message names

        # archive and rejected files are private to the service user
        for folder in (p.archive_dir, p.rejected_dir):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            kept = [x for x in folder.rglob("*") if x.is_file()]
            assert kept, folder
            for path in [*kept, *(x for x in folder.rglob("*") if x.is_dir())]:
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_nothing_outside_the_inbox_is_read_or_moved(tmp_path):
    """'..' names, a symlinked folder and a symlinked file that point outside the inbox."""
    from helpers_data import intake_file

    from db.migrate import upgrade
    from db.session import dispose_engines
    from worker.inbox.watcher import scan_inbox
    from worker.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path}/c.db")
    settings.ensure_dirs()
    upgrade(settings.db_url)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "IM-secret.png"
    original = png_bytes(200)
    secret.write_bytes(original)
    inbox = settings.inbox_dir
    (inbox / "sub").mkdir()
    (inbox / "linked-folder").symlink_to(outside, target_is_directory=True)
    (inbox / "linked-file.png").symlink_to(secret)
    sent: list[int] = []

    def enqueue(batch):
        sent.extend(image_id for image_id, _ in batch)

    try:
        assert intake_file(inbox / "sub" / ".." / ".." / "outside" / "IM-secret.png", settings,
                           enqueue) is None
        assert intake_file(inbox / "linked-folder" / "IM-secret.png", settings, enqueue) is None
        found = [path for path, _ in scan_inbox(inbox, 0.0)]
        assert found == [inbox / "linked-file.png"]  # the linked folder is never walked
        result = intake_file(inbox / "linked-file.png", settings, enqueue)
        assert result is not None and result.status == "rejected" and sent == []
    finally:
        dispose_engines()
    assert secret.read_bytes() == original
    assert sorted(os.listdir(outside)) == ["IM-secret.png"]
    assert not any(settings.archive_dir.rglob("*.png"))
    [moved] = settings.rejected_dir.iterdir()
    assert moved.is_symlink() and moved.resolve() == secret
