"""Intake: hash, archive, record, enqueue, on both database backends; and a hostile inbox.

``enqueue`` is replaced by a recorder (or a failing callable for a broker outage); the real
Redis path is covered by test_pipeline. Permission cases run the intake in a subprocess
without root's powers over other users' files (as the deployed uid 10001 is).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_data import intake_file
from helpers_models import register_tiny_bundle

from db import claims, images, predictions
from db.models import Image
from db.session import session_scope
from db.vocabulary import ImageStatus
from worker.files.storage import archive_relpath
from worker.inbox.intake import (
    display_name,
    inbox_parts,
    intake_files,
    reconcile,
    remove_stale_temps,
    requeue_waiting,
)
from worker.settings import Settings


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url)
    s.ensure_dirs()
    return s


class Recorder:
    """Stands in for the broker: keeps every (image id, file name) and each message's size."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.messages: list[int] = []

    def __call__(self, batch) -> None:
        self.sent += list(batch)
        self.messages.append(len(batch))


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


def test_inbox_parts_refuse_paths_outside(tmp_path):
    inbox = tmp_path / "inbox"
    assert inbox_parts(inbox, inbox / "sub" / "a.png") == ("sub", "a.png")
    assert inbox_parts(inbox, tmp_path / "a.png") is None
    assert inbox_parts(inbox, inbox / "sub" / ".." / ".." / "a.png") is None


def test_a_file_behind_a_symlinked_folder_is_not_taken(settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"not yours")
    (settings.inbox_dir / "escape").symlink_to(outside)
    assert intake_file(settings.inbox_dir / "escape" / "secret.png", settings, Recorder()) is None
    assert (outside / "secret.png").read_bytes() == b"not yours"


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


def test_the_archive_folders_are_made_before_the_first_file_and_again_when_removed(settings):
    """Intake never makes an ``ab/`` folder on its way (a burst's first files would each pay
    for one); if the archive is removed under a running watcher, it is made again."""
    import shutil

    sent = Recorder()
    (settings.inbox_dir / "a.png").write_bytes(b"first")
    intake_file(settings.inbox_dir / "a.png", settings, sent)
    folders = sorted(p.name for p in settings.archive_dir.iterdir() if p.is_dir())
    assert folders == [f"{i:02x}" for i in range(256)]
    assert {_mode(settings.archive_dir / name) for name in folders} == {0o700}
    shutil.rmtree(settings.archive_dir)
    (settings.inbox_dir / "b.png").write_bytes(b"second")
    taken = intake_file(settings.inbox_dir / "b.png", settings, sent)
    stored = settings.data_dir / _row(settings.db_url, taken.image_id).stored_path
    assert stored.read_bytes() == b"second" and _mode(stored.parent) == 0o700
    assert len([p for p in settings.archive_dir.iterdir() if p.is_dir()]) == 256


def test_a_full_disk_while_making_the_archive_folders_is_one_line_and_keeps_the_file(
        settings, monkeypatch, caplog):
    """A folder needs a free block: with none, intake says the disk is full once (no
    traceback), leaves the file in the inbox and no temp link, and makes the folders later."""
    import errno
    import logging
    from pathlib import Path

    archive, make = settings.archive_dir.absolute(), Path.mkdir

    def no_space(self, *args, **kwargs):
        if self.parent == archive:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return make(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_space)
    (settings.inbox_dir / "a.png").write_bytes(b"pixels")
    with caplog.at_level(logging.WARNING):
        assert intake_files([settings.inbox_dir / "a.png"], settings, Recorder()) == []
    assert [r.exc_info for r in caplog.records] == [None]
    assert "disk is full" in caplog.records[0].getMessage()
    assert (settings.inbox_dir / "a.png").exists()
    assert not list(settings.archive_dir.glob(".incoming-*"))
    monkeypatch.undo()
    [taken] = intake_files([settings.inbox_dir / "a.png"], settings, Recorder())
    assert taken.status == ImageStatus.QUEUED
    assert len([p for p in settings.archive_dir.iterdir() if p.is_dir()]) == 256


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
        [prediction_id] = predictions.save_predictions(session, [dict(
            sha256=row.sha256, pneumonia_model_id=model.id, infection_model_id=None,
            p_pneumonia=0.9, p_virus=None, label="PNEUMONIA", threshold=0.5,
            infection_threshold=None,
        )])
        predictions.link_predictions(session, [(first.image_id, prediction_id)])
    (settings.inbox_dir / "copy-of-a.png").write_bytes(b"pixels")
    second = intake_file(settings.inbox_dir / "copy-of-a.png", settings, sent)
    assert second.status == ImageStatus.DONE
    assert len(sent.sent) == 1
    row = _row(settings.db_url, second.image_id)
    assert row.prediction_id == prediction_id and row.finished_at is not None


def test_broker_down_leaves_rows_received_then_reconcile_sends_them(settings):
    def broker_down(batch) -> None:
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


def test_database_down_leaves_the_file_in_the_inbox(settings, monkeypatch):
    src = settings.inbox_dir / "keep.png"
    src.write_bytes(b"precious")

    def db_down(*_a, **_k):
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(images, "record_images", db_down)
    with pytest.raises(RuntimeError):
        intake_file(src, settings, Recorder())
    assert src.read_bytes() == b"precious"
    monkeypatch.undo()
    result = intake_file(src, settings, Recorder())  # the next scan takes it, reusing the copy
    assert result.status == ImageStatus.QUEUED and not src.exists()
    assert len(list(settings.archive_dir.rglob("*.png"))) == 1


def test_waiting_images_are_requeued_once_a_model_is_promoted(settings):
    sent = Recorder()
    (settings.inbox_dir / "w.png").write_bytes(b"w")
    result = intake_file(settings.inbox_dir / "w.png", settings, sent)
    with session_scope(settings.db_url) as session:
        assert images.mark_waiting_model(session, [result.image_id]) == 1
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
        claim = claims.claim(session, result.image_id, max_attempts=3)
        assert claim.attempts == 1 and not claim.gave_up
    with session_scope(settings.db_url) as session:
        assert images.mark_queued_many(session, [result.image_id]) == 0
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


def test_a_claim_past_its_lease_is_sent_again(settings):
    """A holder that hangs keeps its row ``processing``; past the lease the reconcile pass
    sends it again, and that delivery takes it over."""
    settings = settings.model_copy(update={"claim_lease_seconds": 30.0})
    (settings.inbox_dir / "hung.png").write_bytes(b"hung")
    result = intake_file(settings.inbox_dir / "hung.png", settings, Recorder())
    with session_scope(settings.db_url) as session:
        claims.claim(session, result.image_id, max_attempts=3, holder="hung-host:1")
    sent = Recorder()
    assert reconcile(settings, sent, grace_seconds=0) == 0  # within its lease
    with session_scope(settings.db_url) as session:
        session.query(Image).update({Image.claimed_at: images.stale_cutoff(60)})
    assert reconcile(settings, sent, grace_seconds=0) == 1
    assert sent.sent == [(result.image_id, "hung.png")]


KILL_BEFORE_COMMIT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from db import images
    from worker.inbox.intake import intake_files
    from worker.settings import Settings

    def die(*args, **kwargs):  # the watcher is killed after the archive copy, before the commit
        os._exit(9)

    images.record_images = die
    settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
    intake_files([settings.inbox_dir / sys.argv[3]], settings, lambda *_: None)
""")


def test_a_watcher_killed_between_archive_and_commit_loses_nothing(settings):
    path = settings.inbox_dir / "sub" / "Patient 7.jpeg"
    path.parent.mkdir()
    path.write_bytes(b"copied but never recorded")
    crashed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_COMMIT, str(settings.data_dir), settings.db_url,
         "sub/Patient 7.jpeg"], capture_output=True, text=True, timeout=120,
    )
    assert crashed.returncode == 9, crashed.stderr
    assert path.exists()  # the inbox file goes only once its row is committed
    with session_scope(settings.db_url) as session:
        assert session.query(Image).count() == 0
    sent = Recorder()
    result = intake_file(path, settings, sent)
    assert sent.sent == [(result.image_id, "sub/Patient 7.jpeg")]
    row = _row(settings.db_url, result.image_id)
    assert (settings.data_dir / row.stored_path).read_bytes() == b"copied but never recorded"
    assert not path.exists()


def _inbox_files(settings: Settings, n: int) -> list[Path]:
    paths = [settings.inbox_dir / f"f{k}.png" for k in range(n)]
    for k, path in enumerate(paths):
        path.write_bytes(f"content {k}".encode())
    return paths


def test_a_batch_is_one_transaction_and_messages_of_message_size(settings):
    settings = settings.model_copy(update={"message_size": 4})
    paths = _inbox_files(settings, 10)
    sent = Recorder()
    results = intake_files(paths, settings, sent)
    assert [r.status for r in results] == [ImageStatus.QUEUED] * 10
    assert sent.messages == [4, 4, 2]
    assert sorted(n for _, n in sent.sent) == sorted(p.name for p in paths)
    assert not any(p.exists() for p in paths)


def test_a_bursts_first_batch_can_be_small_so_a_worker_starts_sooner(settings):
    paths = _inbox_files(settings, 40)
    sent = Recorder()
    results = intake_files(paths[:30], settings, sent, first_batch=16)
    assert sent.messages == [16, 14]
    assert [n for _, n in sent.sent] == [p.name for p in paths[:30]]
    sent = Recorder()
    results += intake_files(paths[30:], settings, sent, first_batch=16)
    assert sent.messages == [10]
    assert [r.status for r in results] == [ImageStatus.QUEUED] * 40
    assert intake_files([], settings, sent, first_batch=16) == []


def test_an_interrupted_copy_leaves_no_temp_file(settings, monkeypatch):
    from worker.files import safefs

    path = settings.inbox_dir / "big.png"
    path.write_bytes(b"x" * 100)

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safefs, "link_entry", lambda *_: None)  # as for another user's file
    monkeypatch.setattr(safefs.os, "write", disk_full)
    assert intake_file(path, settings, Recorder()) is None
    monkeypatch.undo()
    assert path.exists()
    assert not list(settings.archive_dir.glob(".incoming-*"))
    stale = settings.archive_dir / ".incoming-dead.tmp"
    stale.write_bytes(b"left by a killed watcher")
    os.utime(stale, (0, 0))
    assert remove_stale_temps(settings) == 1 and not stale.exists()


def test_hard_linked_and_oversized_files_are_refused_once_before_reading(settings, tmp_path):
    settings = settings.model_copy(update={"max_file_bytes": 1000})
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"a file with two names")
    os.link(elsewhere, settings.inbox_dir / "linked.png")
    (settings.inbox_dir / "huge.png").write_bytes(b"x" * 1001)
    sent = Recorder()
    results = intake_files(sorted(settings.inbox_dir.iterdir()), settings, sent)
    assert sent.sent == [] and [r.status for r in results] == ["rejected", "rejected"]
    rows = {r.file_name: _row(settings.db_url, r.image_id) for r in results}
    assert "2 hard links" in rows["linked.png"].error
    assert "file too large: 1,001 bytes" in rows["huge.png"].error
    assert "CXR_MAX_FILE_BYTES" in rows["huge.png"].error
    assert elsewhere.read_bytes() == b"a file with two names"  # the other name is untouched
    assert sorted(p.name.split("-", 1)[1] for p in settings.rejected_dir.iterdir()) == [
        "huge.png", "linked.png"]
    assert not list(settings.inbox_dir.iterdir())
    assert not list(settings.archive_dir.rglob("*.png"))


def test_a_name_that_is_not_utf8_is_recorded_readably(settings):
    raw = os.fsencode(settings.inbox_dir) + b"/IM-\xff\xfe-1.png"
    with open(raw, "wb") as fh:
        fh.write(b"bytes")
    path = settings.inbox_dir / os.fsdecode(b"IM-\xff\xfe-1.png")
    sent = Recorder()
    result = intake_file(path, settings, sent)
    assert result.status == ImageStatus.QUEUED
    assert result.file_name == "IM-\ufffd\ufffd-1.png" == display_name(("IM-\udcff\udcfe-1.png",))
    assert _row(settings.db_url, result.image_id).file_name == "IM-\ufffd\ufffd-1.png"
    assert not os.path.exists(raw)


@pytest.mark.parametrize("inbox", ["var", "var/archive", "var/archive/in", "var/models",
                                   "var/rejected", "."])
def test_an_inbox_overlapping_the_service_folders_is_refused(tmp_path, inbox):
    from db.exceptions import CxrError

    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / inbox)
    with pytest.raises(CxrError, match="inbox"):
        settings.ensure_dirs()


def test_data_folder_and_database_are_private(tmp_path):
    from db.migrate import upgrade

    settings = Settings(data_dir=tmp_path / "fresh")
    settings.ensure_dirs()
    upgrade(settings.db_url)
    assert _mode(settings.data_dir) == 0o700
    assert _mode(settings.data_dir / "cxr.db") == 0o600
