"""The inbox attacks of issue 20's probe (service uid 10001, strangers writing the inbox): an
entry that cannot be moved to rejected/, the inbox swapped for a link, rows duplicated by a
restart, hidden folders fed by events, entries never taken without a word, a full disk.

Permission cases reuse tests/test_hostile_inbox.py's unprivileged runner (root without the
capabilities that let it ignore other users' files).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers_data import intake_file, tmpfs
from test_hostile_inbox import OTHER_UID, UNPRIVILEGED, Recorder, _intake_unprivileged

from db.models import Image
from db.session import dispose_engines, session_scope
from db.vocabulary import ImageStatus
from worker.files import safefs
from worker.inbox.filters import is_candidate_in
from worker.inbox.intake import intake_files
from worker.inbox.watcher import Watcher
from worker.settings import Settings

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make other users' files")


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url, stable_seconds=0.2,
                 rescan_seconds=0.5)
    s.ensure_dirs()
    return s


def _rows(settings: Settings) -> list[Image]:
    with session_scope(settings.db_url) as session:
        return list(session.query(Image).order_by(Image.id))


def _wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# 1. One refused entry must cost that entry only.

@pytest.mark.parametrize("name", [
    os.fsdecode(b"S" * 250 + b".jpeg"),  # 255 bytes: no room for rejected/'s prefix
    os.fsdecode(b"\xff" * 89 + b".jpeg"),  # 94 bytes, 272 once made valid UTF-8
], ids=["255-bytes", "not-utf8"])
def test_a_link_whose_name_does_not_fit_rejected_is_refused_and_the_rest_taken(settings, name):
    link = settings.inbox_dir / name
    link.symlink_to("/etc/passwd")
    good = settings.inbox_dir / "IM-good.png"
    good.write_bytes(b"an x-ray")
    sent = Recorder()
    results = intake_files([link, good], settings, sent)
    assert sorted(r.status for r in results) == [ImageStatus.QUEUED, ImageStatus.REJECTED]
    assert [n for _, n in sent.sent] == ["IM-good.png"]
    assert not good.exists() and not os.path.lexists(link)
    [kept] = settings.rejected_dir.iterdir()
    assert kept.is_symlink() and kept.name.endswith(".jpeg") and len(os.fsencode(kept.name)) <= 255
    [refused] = [r for r in _rows(settings) if r.status == ImageStatus.REJECTED]
    assert refused.error.startswith("symbolic link")
    assert refused.stored_path == f"rejected/{kept.name}"
    assert intake_files([link, good], settings, sent) == []


@needs_root
def test_a_link_in_a_folder_the_service_cannot_write_is_recorded_once_and_left(settings):
    """An ``rsync -a`` export: a 755 folder owned by its writer, holding one link."""
    folder = settings.inbox_dir / "export"
    folder.mkdir()
    (folder / "IM-link.png").symlink_to("/etc/passwd")
    os.lchown(folder / "IM-link.png", OTHER_UID, OTHER_UID)
    os.chown(folder, OTHER_UID, OTHER_UID)
    os.chmod(folder, 0o755)
    (settings.inbox_dir / "IM-good.png").write_bytes(b"an x-ray")
    first, again = _intake_unprivileged(settings, "export/IM-link.png", "IM-good.png")
    assert first == {"export/IM-link.png": "rejected", "IM-good.png": "queued"} and again == {}
    restarted = _intake_unprivileged(settings, "export/IM-link.png", "IM-good.png")
    assert restarted == ({}, {})
    rows = {r.file_name: r for r in _rows(settings)}
    assert len(rows) == 2 and (folder / "IM-link.png").is_symlink()
    assert rows["export/IM-link.png"].error == (
        "symbolic link; links are not followed (copy the file itself into the inbox); left in "
        "the inbox (it cannot be moved to rejected/: Permission denied)")


# 5. A file the service cannot remove gets one row, however often the watcher restarts.

@needs_root
def test_files_left_in_an_unwritable_folder_get_one_row_across_restarts(settings):
    folder = settings.inbox_dir / "export"
    folder.mkdir()
    names = [f"export/IM-{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        path = settings.inbox_dir / name
        path.write_bytes(f"x-ray {i}".encode())
        os.chown(path, OTHER_UID, OTHER_UID)
    os.chown(folder, OTHER_UID, OTHER_UID)
    os.chmod(folder, 0o755)
    for start in range(3):
        first, again = _intake_unprivileged(settings, *names)
        assert first == ({name: "queued" for name in names} if start == 0 else {})
        assert again == {}
    assert sorted(r.file_name for r in _rows(settings)) == names
    assert all((settings.inbox_dir / name).exists() for name in names)
    # What tells a file left behind from a new one: it has not changed since its row.
    path = settings.inbox_dir / "IM-again.png"
    for _ in range(2):
        path.write_bytes(b"the same x-ray, sent twice")
        assert intake_file(path, settings, Recorder()).status == ImageStatus.QUEUED
    assert len(_rows(settings)) == len(names) + 2


# 2. The inbox swapped for a link: nothing outside it is taken, the watcher keeps running.

@pytest.mark.parametrize("target", ["archive", "elsewhere"])
def test_an_inbox_swapped_for_a_link_takes_nothing_and_says_so(settings, tmp_path, caplog,
                                                               target):
    sent = Recorder()
    inbox = settings.inbox_dir
    stop = threading.Event()
    watcher = Watcher(settings, enqueue=sent)
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    try:
        (inbox / "IM-first.png").write_bytes(b"the first x-ray")
        _wait_for(lambda: sent.sent)
        [row] = _rows(settings)
        archived = settings.data_dir / row.stored_path
        if target == "archive":
            elsewhere = archived.parent
        else:
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            (elsewhere / "IM-not-ours.png").write_bytes(b"someone else's file")
        inbox.rename(inbox.with_name("inbox.real"))
        inbox.symlink_to(elsewhere)
        old = time.time() - 60
        for path in elsewhere.iterdir():
            os.utime(path, (old, old))
        _wait_for(lambda: any("taking nothing from the inbox" in r.getMessage()
                              for r in caplog.records) or len(list(elsewhere.iterdir())) < 1)
        assert archived.read_bytes() == b"the first x-ray" and len(_rows(settings)) == 1
        assert len(list(elsewhere.iterdir())) == 1
        assert thread.is_alive()
        inbox.unlink()
        inbox.with_name("inbox.real").rename(inbox)
        (inbox / "IM-later.png").write_bytes(b"taken once the inbox is back")
        _wait_for(lambda: len(sent.sent) == 2)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [n for _, n in sent.sent] == ["IM-first.png", "IM-later.png"]


def test_intake_refuses_an_inbox_that_is_not_the_folder_held(settings, tmp_path):
    fd = safefs.open_root(settings.inbox_dir)
    held = safefs.identity(os.fstat(fd))
    os.close(fd)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "IM-1.png").write_bytes(b"not ours")
    settings.inbox_dir.rename(tmp_path / "inbox.real")
    settings.inbox_dir.symlink_to(outside)
    with pytest.raises(safefs.InboxMoved):
        intake_files([settings.inbox_dir / "IM-1.png"], settings, Recorder(), inbox=held)
    with pytest.raises(safefs.InboxMoved):  # a link is refused even with nothing to compare
        intake_files([settings.inbox_dir / "IM-1.png"], settings, Recorder())
    assert (outside / "IM-1.png").exists() and _rows(settings) == []


# 7. One rule for events and the scan: nothing under a hidden folder, no rsync temp name.

@pytest.mark.parametrize("rel,taken", [
    ("IM-1.jpeg", True), ("export/IM-1.jpeg", True), (".rsync-tmp/IM-1.jpeg", False),
    ("export/.~tmp~/IM-1.jpeg", False), ("export/.IM-1.jpeg.Xy12Ab", False),
    (".git/objects/ab", False),
])
def test_hidden_folders_and_rsync_temps_are_never_candidates(tmp_path, rel, taken):
    assert is_candidate_in(tmp_path, tmp_path / rel) is taken


def test_events_follow_the_scan_depth_rule(tmp_path):
    assert is_candidate_in(tmp_path, tmp_path.joinpath(*["d"] * 32, "IM-1.png"), 32)
    assert not is_candidate_in(tmp_path, tmp_path.joinpath(*["d"] * 33, "IM-1.png"), 32)


def test_files_arriving_by_events_in_hidden_folders_are_not_taken(settings):
    sent = Recorder()
    inbox = settings.inbox_dir
    for folder in (".rsync-tmp", "export/.~tmp~"):
        (inbox / folder).mkdir(parents=True)
    stop = threading.Event()
    watcher = Watcher(settings, enqueue=sent)
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        (inbox / "IM-0.jpeg").write_bytes(b"first: the watcher is watching")
        _wait_for(lambda: sent.sent)
        for rel in (".rsync-tmp/IM-1.jpeg", "export/.~tmp~/IM-2.jpeg", "export/.IM-3.jpeg.a1B2c3"):
            shutil.copyfile(__file__, inbox / rel)
        shutil.copyfile(__file__, inbox / "export" / "IM-4.jpeg")
        _wait_for(lambda: len(sent.sent) >= 2)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [n for _, n in sent.sent] == ["IM-0.jpeg", "export/IM-4.jpeg"]
    assert len(_rows(settings)) == 2


# 8. What is never taken is said once per entry, and never opened.

SCAN_TWICE = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from worker.settings import Settings
    from worker.inbox.watcher import Watcher

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
    watcher = Watcher(settings, enqueue=lambda batch: None)
    watcher._scan()
    watcher._scan()
""")


@needs_root
def test_entries_never_taken_are_each_said_once(settings):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    inbox = settings.inbox_dir
    for name, mode in (("locked", 0o000), ("private", 0o700)):
        (inbox / name).mkdir()
        (inbox / name / "IM-1.png").write_bytes(b"x")
        os.chown(inbox / name, OTHER_UID, OTHER_UID)
        os.chmod(inbox / name, mode)
    os.mkfifo(inbox / "IM-fifo.png")
    os.mknod(inbox / "IM-socket.png", stat.S_IFSOCK | 0o644)
    os.mknod(inbox / "IM-device.png", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    deep = inbox.joinpath(*["d"] * 33)
    deep.mkdir(parents=True)
    (deep / "IM-deep.png").write_bytes(b"x")
    done = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-c", SCAN_TWICE, str(settings.data_dir), settings.db_url],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    said = sorted(line.split(" is not taken")[0] for line in done.stdout.splitlines()
                  if " is not taken" in line)
    assert said == sorted(["locked", "private", "IM-fifo.png", "IM-socket.png",
                           "IM-device.png", "/".join(["d"] * 33)])


@needs_root
def test_a_fifo_or_device_node_is_never_opened(settings, monkeypatch):
    inbox = settings.inbox_dir
    os.mkfifo(inbox / "IM-fifo.png")
    os.mknod(inbox / "IM-device.png", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    opened: list[str] = []
    real_open = os.open

    def watching_open(path, *args, **kwargs):
        opened.append(os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safefs.os, "open", watching_open)
    for name in ("IM-fifo.png", "IM-device.png"):
        assert intake_file(inbox / name, settings, Recorder()) is None
    monkeypatch.undo()
    assert not [p for p in opened if p.startswith("IM-")]
    assert _rows(settings) == [] and (inbox / "IM-fifo.png").exists()


# 9. A full disk: one line per pass, not a traceback per file.

@pytest.fixture
def full_disk(tmp_path):
    """A data dir on a 256 KiB tmpfs (we are root), filled once its folders exist."""
    with tmpfs(tmp_path / "small-fs", "256k") as mount:
        try:
            yield mount
        finally:
            dispose_engines()


def test_a_full_disk_logs_one_line_a_pass_and_keeps_every_file(tmp_path, full_disk, caplog):
    settings = Settings(data_dir=full_disk / "var", inbox=tmp_path / "inbox",
                        database_url=f"sqlite:///{tmp_path / 'cxr.db'}")
    settings.ensure_dirs()
    from db.migrate import upgrade

    upgrade(settings.db_url)
    filler = os.open(settings.archive_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(filler, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(filler)
    names = [f"IM-{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        # not zeros: archive copies keep holes, so a file of zeros needs no free block
        (settings.inbox_dir / name).write_bytes(bytes([i + 1]) * 65536)
    with caplog.at_level(logging.WARNING):
        results = intake_files([settings.inbox_dir / n for n in names], settings, Recorder())
    assert results == []
    assert [r.exc_info for r in caplog.records] == [None]
    assert "disk is full" in caplog.records[0].getMessage()
    assert "5 file(s) stay in the inbox" in caplog.records[0].getMessage()
    assert sorted(p.name for p in settings.inbox_dir.iterdir()) == names
    assert not list(settings.archive_dir.glob(".incoming-*"))
