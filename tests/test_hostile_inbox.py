"""The inbox as an attacker or a careless exporter writes it: links swapped in mid-intake,
files owned by another user, folders too deep to walk, another filesystem.

Permission cases run the intake in a subprocess that keeps uid 0 but loses the capabilities
that let root ignore other users' files (``setpriv --bounding-set``), which is what the
deployed service (uid 10001) lives with; CI runs as root, which would hide these bugs.
"""

from __future__ import annotations

import json
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

from db.migrate import upgrade
from db.models import Image
from db.session import dispose_engines, session_scope
from db.vocabulary import ImageStatus
from worker.files import safefs
from worker.inbox.intake import intake_files
from worker.settings import Settings

UNPRIVILEGED = ["setpriv", "--bounding-set=-fowner,-dac_override,-dac_read_search,-chown", "--"]
OTHER_UID = 4321


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def __call__(self, batch) -> None:
        self.sent += list(batch)


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'cxr.db'}")
    s.ensure_dirs()
    upgrade(s.db_url)
    yield s
    dispose_engines()


def _rows(settings: Settings) -> dict[str, Image]:
    with session_scope(settings.db_url) as session:
        return {row.file_name: row for row in session.query(Image)}


SWAP_POINTS = ["before_link", "while_hashing"]


def _swap_during_intake(monkeypatch, swap, when: str) -> None:
    """Run ``swap()`` once the file is open: before its archive link is made, or while it is
    being hashed (or copied, for a file that cannot be linked)."""
    names = ["link_entry"] if when == "before_link" else ["hash_entry", "copy_hashing"]
    done = []
    for name in names:
        real = getattr(safefs, name)

        def swapped(*args, real=real):
            if not done:
                done.append(swap())
            return real(*args)

        monkeypatch.setattr(safefs, name, swapped)


@pytest.mark.parametrize("when", SWAP_POINTS)
def test_a_folder_swapped_for_a_link_mid_intake_moves_nothing_from_outside(
        settings, tmp_path, monkeypatch, when):
    outside = tmp_path / "models"
    outside.mkdir()
    (outside / "IM-1.png").write_bytes(b"production model bytes")
    folder = settings.inbox_dir / "export"
    folder.mkdir()
    (folder / "IM-1.png").write_bytes(b"the real x-ray")

    def swap():
        folder.rename(settings.inbox_dir / ".export-old")
        folder.symlink_to(outside)

    _swap_during_intake(monkeypatch, swap, when)
    result = intake_file(folder / "IM-1.png", settings, Recorder())
    assert result is not None and result.status == ImageStatus.QUEUED
    row = _rows(settings)["export/IM-1.png"]
    archived = settings.data_dir / row.stored_path
    assert archived.read_bytes() == b"the real x-ray" and not archived.is_symlink()
    assert (outside / "IM-1.png").read_bytes() == b"production model bytes"
    assert stat.S_IMODE((outside / "IM-1.png").stat().st_mode) == 0o644
    assert not (settings.inbox_dir / ".export-old" / "IM-1.png").exists()  # the one taken
    assert not list(settings.archive_dir.glob(".incoming-*"))


@pytest.mark.parametrize("when", SWAP_POINTS)
def test_a_file_swapped_for_a_link_mid_intake_leaves_no_link_in_the_archive(
        settings, tmp_path, monkeypatch, when):
    target = tmp_path / "cxr-secret.db"
    target.write_bytes(b"database")
    os.chmod(target, 0o644)
    path = settings.inbox_dir / "a.png"
    path.write_bytes(b"image")

    def swap():
        path.unlink()
        path.symlink_to(target)

    _swap_during_intake(monkeypatch, swap, when)
    result = intake_file(path, settings, Recorder())
    archived = settings.data_dir / _rows(settings)["a.png"].stored_path
    assert result.status == ImageStatus.QUEUED and archived.read_bytes() == b"image"
    assert not any(p.is_symlink() for p in settings.archive_dir.rglob("*"))
    assert target.read_bytes() == b"database" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert path.is_symlink()  # not what was taken, so not removed; the next scan rejects it
    monkeypatch.undo()
    again = intake_file(path, settings, Recorder())
    assert again.status == ImageStatus.REJECTED and target.exists()


UNPRIVILEGED_INTAKE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from worker.inbox.intake import intake_files
    from worker.settings import Settings

    settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
    paths = [settings.inbox_dir / name for name in sys.argv[3:]]
    results = intake_files(paths, settings, lambda batch: None)
    again = intake_files(paths, settings, lambda batch: None)  # the next scan, same watcher
    print(json.dumps([[[r.file_name, r.status] for r in rs] for rs in (results, again)]))
""")


def _intake_unprivileged(settings: Settings, *names: str) -> dict[str, str]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    done = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-c", UNPRIVILEGED_INTAKE, str(settings.data_dir),
         settings.db_url, *names],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    first, again = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(first), dict(again)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's files")
def test_files_owned_by_another_user_are_taken_and_unreadable_ones_refused(settings):
    readable = settings.inbox_dir / "IM-modality.png"
    readable.write_bytes(b"written by the modality's uid")
    locked = settings.inbox_dir / "IM-locked.png"
    locked.write_bytes(b"mode 0600, someone else's")
    for path, mode in ((readable, 0o644), (locked, 0o600)):
        os.chown(path, OTHER_UID, OTHER_UID)
        os.chmod(path, mode)
    statuses, again = _intake_unprivileged(settings, "IM-modality.png", "IM-locked.png")
    assert statuses == {"IM-modality.png": "queued", "IM-locked.png": "rejected"} and again == {}
    rows = _rows(settings)
    archived = settings.data_dir / rows["IM-modality.png"].stored_path
    assert archived.read_bytes() == b"written by the modality's uid"
    assert archived.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(archived.stat().st_mode) == 0o600
    assert rows["IM-locked.png"].error.startswith("permission denied")
    [kept] = settings.rejected_dir.iterdir()
    assert kept.name.endswith("IM-locked.png") and kept.stat().st_uid == OTHER_UID
    assert not list(settings.inbox_dir.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's folder")
def test_a_file_the_service_cannot_remove_is_recorded_once(settings):
    """A folder the exporter made with umask 022: readable, not writable by the service."""
    folder = settings.inbox_dir / "export"
    folder.mkdir()
    (folder / "IM-1.png").write_bytes(b"readable, not removable")
    for path, mode in ((folder / "IM-1.png", 0o644), (folder, 0o755)):
        os.chown(path, OTHER_UID, OTHER_UID)
        os.chmod(path, mode)
    statuses, again = _intake_unprivileged(settings, "export/IM-1.png")
    assert statuses == {"export/IM-1.png": "queued"} and again == {}
    assert len(_rows(settings)) == 1 and (folder / "IM-1.png").exists()


@pytest.fixture
def tmpfs_inbox(tmp_path):
    """An inbox on its own tmpfs mount: another filesystem than the archive."""
    with tmpfs(tmp_path / "inbox-fs", "16m") as mount:
        yield mount


def test_an_inbox_on_another_filesystem_is_copied_and_refusals_recorded_once(
        tmp_path, tmpfs_inbox):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmpfs_inbox,
                        database_url=f"sqlite:///{tmp_path / 'cxr.db'}")
    settings.ensure_dirs()
    upgrade(settings.db_url)
    try:
        assert os.stat(tmpfs_inbox).st_dev != os.stat(settings.archive_dir).st_dev
        (tmpfs_inbox / "a.png").write_bytes(b"across filesystems")
        (tmpfs_inbox / "link.png").symlink_to("/etc/passwd")
        sent = Recorder()
        first = {r.file_name: r.status for r in intake_files(
            [tmpfs_inbox / "a.png", tmpfs_inbox / "link.png"], settings, sent)}
        assert first == {"a.png": "queued", "link.png": "rejected"}
        assert not (tmpfs_inbox / "a.png").exists()
        assert not list(settings.archive_dir.glob(".incoming-*"))
        rows = _rows(settings)
        archived = settings.data_dir / rows["a.png"].stored_path
        assert archived.read_bytes() == b"across filesystems"
        assert "left in the inbox (rejected/ is on another filesystem)" in rows["link.png"].error
        assert (tmpfs_inbox / "link.png").is_symlink()
        assert intake_files([tmpfs_inbox / "link.png"], settings, sent) == []  # once
        assert len(_rows(settings)) == 2
    finally:
        dispose_engines()


def test_a_tree_too_deep_to_walk_does_not_stop_the_watcher(settings):
    from worker.inbox.watcher import Watcher

    fd = os.open(settings.inbox_dir, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    settings = settings.model_copy(update={"stable_seconds": 0.2})
    (settings.inbox_dir / "top.png").write_bytes(b"top")
    sent = Recorder()
    stop = threading.Event()
    watcher = Watcher(settings, enqueue=sent)
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(sent.sent) < 2:
            if len(sent.sent) == 1:
                (settings.inbox_dir / "later.png").write_bytes(b"later")
            time.sleep(0.3)
        assert thread.is_alive()
        assert sorted(name for _, name in sent.sent) == ["later.png", "top.png"]
    finally:
        stop.set()
        thread.join(timeout=10)
        subprocess.run(["rm", "-rf", str(settings.inbox_dir / "d")], check=True)  # no recursion
    dispose_engines()
