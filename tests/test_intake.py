"""Intake: hash, archive, record, enqueue, on both database backends.

``enqueue`` is replaced by a recorder (or a failing callable for a broker outage); the real
Redis path is covered by test_pipeline.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
from helpers_models import register_tiny_bundle

from db import images
from db.models import Image
from db.session import session_scope
from db.vocabulary import ImageStatus
from worker.intake import (
    adopt_pending,
    inbox_name,
    intake_file,
    reconcile,
    requeue_waiting,
)
from worker.settings import Settings
from worker.storage import archive_relpath


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url)
    s.ensure_dirs()
    return s


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def __call__(self, image_id: int, file_name: str) -> None:
        self.sent.append((image_id, file_name))


def _row(url: str, image_id: int) -> Image:
    with session_scope(url) as session:
        return session.get(Image, image_id)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_archive_path_is_content_addressed():
    sha = "ab" + "0" * 62
    assert archive_relpath(sha, ".JPEG").as_posix() == f"archive/ab/{sha}.jpeg"
    assert archive_relpath(sha, "").as_posix() == f"archive/ab/{sha}.bin"
    assert archive_relpath(sha, ".we ird").as_posix() == f"archive/ab/{sha}.bin"


def test_inbox_name_refuses_paths_outside(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    assert inbox_name(inbox, inbox / "sub" / "a.png") == "sub/a.png"
    assert inbox_name(inbox, tmp_path / "a.png") is None
    (inbox / "escape").symlink_to(tmp_path)
    assert inbox_name(inbox, inbox / "escape" / "a.png") is None


def test_intake_archives_records_and_enqueues(settings):
    src = settings.inbox_dir / "sub" / "IM-0001.JPEG"
    src.parent.mkdir()
    src.write_bytes(b"jpeg bytes")
    sent = Recorder()
    result = intake_file(src, settings, sent)
    assert result.status == ImageStatus.QUEUED
    assert sent.sent == [(result.image_id, "sub/IM-0001.JPEG")]
    assert not src.exists()
    row = _row(settings.db_url, result.image_id)
    assert row.status == ImageStatus.QUEUED
    archived = settings.data_dir.absolute() / row.stored_path
    assert archived.read_bytes() == b"jpeg bytes"
    assert archived.name == f"{row.sha256}.jpeg"
    assert archived.parent.name == row.sha256[:2]
    assert _mode(archived) == 0o600
    assert _mode(archived.parent) == 0o700
    assert _mode(settings.archive_dir) == 0o700


def test_same_content_twice_gives_two_rows_one_archive_file(settings):
    sent = Recorder()
    for name in ("first.png", "second.png"):
        (settings.inbox_dir / name).write_bytes(b"same content")
    a = intake_file(settings.inbox_dir / "first.png", settings, sent)
    b = intake_file(settings.inbox_dir / "second.png", settings, sent)
    assert a.image_id != b.image_id
    ra, rb = _row(settings.db_url, a.image_id), _row(settings.db_url, b.image_id)
    assert ra.sha256 == rb.sha256 and ra.stored_path == rb.stored_path
    assert len(list(settings.archive_dir.rglob("*.png"))) == 1
    assert [name for _, name in sent.sent] == ["first.png", "second.png"]


def test_content_already_classified_by_production_models_is_linked(settings):
    model_version = register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    assert model_version == 1
    sent = Recorder()
    (settings.inbox_dir / "a.png").write_bytes(b"pixels")
    first = intake_file(settings.inbox_dir / "a.png", settings, sent)
    with session_scope(settings.db_url) as session:
        from db import registry

        model = registry.get_production(session, "pneumonia")
        row = session.get(Image, first.image_id)
        prediction = images.save_prediction(
            session, sha256=row.sha256, pneumonia_model_id=model.id, infection_model_id=None,
            p_pneumonia=0.9, p_virus=None, label="PNEUMONIA", threshold=0.5,
            infection_threshold=None,
        )
        images.link_prediction(session, first.image_id, prediction.id)
    (settings.inbox_dir / "copy-of-a.png").write_bytes(b"pixels")
    second = intake_file(settings.inbox_dir / "copy-of-a.png", settings, sent)
    assert second.status == ImageStatus.DONE
    assert len(sent.sent) == 1
    row = _row(settings.db_url, second.image_id)
    assert row.prediction_id == prediction.id and row.finished_at is not None


def test_broker_down_leaves_rows_received_then_reconcile_sends_them(settings):
    def broker_down(image_id: int, name: str) -> None:
        raise ConnectionError("redis unreachable")

    (settings.inbox_dir / "a.jpeg").write_bytes(b"a")
    result = intake_file(settings.inbox_dir / "a.jpeg", settings, broker_down)
    assert result.status == ImageStatus.RECEIVED
    assert _row(settings.db_url, result.image_id).status == ImageStatus.RECEIVED
    sent = Recorder()
    assert reconcile(settings, sent) == 0  # too fresh: an intake may still be sending it
    assert reconcile(settings, sent, grace_seconds=0) == 1
    assert sent.sent == [(result.image_id, "a.jpeg")]
    assert _row(settings.db_url, result.image_id).status == ImageStatus.QUEUED


def test_database_down_puts_the_file_back(settings, monkeypatch):
    src = settings.inbox_dir / "keep.png"
    src.write_bytes(b"precious")

    def db_down(*_a, **_k):
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(images, "record_image", db_down)
    with pytest.raises(RuntimeError):
        intake_file(src, settings, Recorder())
    assert src.read_bytes() == b"precious"


def test_waiting_images_are_requeued_once_a_model_is_promoted(settings):
    sent = Recorder()
    (settings.inbox_dir / "w.png").write_bytes(b"w")
    result = intake_file(settings.inbox_dir / "w.png", settings, sent)
    with session_scope(settings.db_url) as session:
        assert images.mark_waiting_model(session, result.image_id)
    assert requeue_waiting(settings, sent) == 0  # still no production model
    assert reconcile(settings, sent, grace_seconds=0) == 0
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    assert requeue_waiting(settings, sent) == 1
    assert sent.sent[-1] == (result.image_id, "w.png")
    assert _row(settings.db_url, result.image_id).status == ImageStatus.QUEUED


def test_mark_queued_never_overwrites_a_later_status(settings):
    (settings.inbox_dir / "r.png").write_bytes(b"r")
    result = intake_file(settings.inbox_dir / "r.png", settings, lambda *_: None)
    with session_scope(settings.db_url) as session:
        claim = images.claim(session, result.image_id, max_attempts=3)
        assert claim.attempts == 1 and not claim.gave_up
    with session_scope(settings.db_url) as session:
        assert not images.mark_queued(session, result.image_id)
    assert _row(settings.db_url, result.image_id).status == ImageStatus.PROCESSING


def test_queued_rows_whose_message_was_lost_are_sent_again(settings):
    settings = settings.model_copy(update={"visibility_timeout": 30.0})
    sent = Recorder()
    (settings.inbox_dir / "lost.png").write_bytes(b"lost")
    result = intake_file(settings.inbox_dir / "lost.png", settings, sent)
    assert result.status == ImageStatus.QUEUED
    assert reconcile(settings, sent, grace_seconds=0, queue_empty=lambda: True) == 0  # recent
    with session_scope(settings.db_url) as session:
        session.query(Image).update({Image.received_at: images.stale_cutoff(60)})
    assert reconcile(settings, sent, grace_seconds=0, queue_empty=lambda: False) == 0
    assert reconcile(settings, sent, grace_seconds=0, queue_empty=lambda: True) == 1
    assert sent.sent == [(result.image_id, "lost.png")] * 2


KILL_BEFORE_COMMIT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from db import images
    from worker.intake import intake_file
    from worker.settings import Settings

    def die(*args, **kwargs):  # the watcher is killed after the move, before the commit
        os._exit(9)

    images.record_image = die
    settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
    intake_file(settings.inbox_dir / sys.argv[3], settings, lambda *_: None)
""")


def test_a_watcher_killed_between_archive_and_commit_loses_nothing(settings):
    path = settings.inbox_dir / "sub" / "Patient 7.jpeg"
    path.parent.mkdir()
    path.write_bytes(b"moved but never recorded")
    crashed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_COMMIT, str(settings.data_dir), settings.db_url,
         "sub/Patient 7.jpeg"], capture_output=True, text=True, timeout=120,
    )
    assert crashed.returncode == 9, crashed.stderr
    assert not path.exists()
    assert [p.name for p in settings.archive_dir.rglob("*.jpeg")]
    with session_scope(settings.db_url) as session:
        assert session.query(Image).count() == 0
    sent = Recorder()
    assert adopt_pending(settings, sent) == 0  # too fresh: could be another watcher's intake
    assert adopt_pending(settings, sent, min_age_seconds=0) == 1
    [(image_id, name)] = sent.sent
    row = _row(settings.db_url, image_id)
    assert (name, row.file_name, row.status) == ("sub/Patient 7.jpeg", name, ImageStatus.QUEUED)
    assert (settings.data_dir / row.stored_path).read_bytes() == b"moved but never recorded"
    assert not list((settings.archive_dir / ".pending").iterdir())
    assert adopt_pending(settings, sent, min_age_seconds=0) == 0


def test_a_completed_intake_leaves_no_pending_note(settings):
    path = settings.inbox_dir / "ok.jpeg"
    path.write_bytes(b"fine")
    intake_file(path, settings, Recorder())
    assert not list((settings.archive_dir / ".pending").iterdir())
