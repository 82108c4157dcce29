"""The one owner of the data folder's file layout: where archived and rejected files go, under
which names, with which permissions.

Archived files are content-addressed (``archive/ab/<sha256>.<ext>``); a file that fails to
decode moves to ``rejected/`` under that same name, so a later twin still finds it. An inbox
entry that was never read (a link, a file the service may not open) gets
``rejected/<random>-<name>``. A file recorded that the service could not remove from the inbox
(a folder it may not write) is listed in ``inbox-left``, so that no later watcher records it
again. Inbox files themselves are only touched through handles
(``worker.files.safefs``). A prediction's heatmap is ``heatmaps/ab/<sha256>-p<stage-1 model
id>-i<stage-2 model id or 0>.png``: one per content and models, like the prediction itself.
Folders holding patient images are 0700 and files 0600.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from pathlib import Path

from worker.settings import Settings


def archive_relpath(sha256: str, suffix: str) -> Path:
    """``archive/ab/<sha256>.<ext>``, relative to the data dir."""
    ext = suffix.lower().lstrip(".")
    ext = ext if ext.isalnum() and len(ext) <= 8 else "bin"
    return Path("archive") / sha256[:2] / f"{sha256}.{ext}"


def heatmap_relpath(sha256: str, pneumonia_model_id: int, infection_model_id: int | None
                    ) -> Path:
    """``heatmaps/ab/<sha256>-p<id>-i<id>.png``, relative to the data dir."""
    name = f"{sha256}-p{int(pneumonia_model_id)}-i{int(infection_model_id or 0)}.png"
    return Path("heatmaps") / sha256[:2] / name


def write_private(settings: Settings, relpath: Path, data: bytes) -> str:
    """Write ``data`` at ``relpath`` under the data dir, 0600 in 0700 folders, through a
    temporary file renamed into place (a reader never sees half a file); returns the path
    as recorded in the database."""
    target = settings.data_dir.absolute() / relpath
    private_dirs(settings.data_dir.absolute() / Path(relpath).parts[0], target.parent)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return relative_to_data(settings, target)


def relative_to_data(settings: Settings, path: Path) -> str:
    """How a stored path is recorded in the database: relative to the data dir."""
    return Path(path).relative_to(settings.data_dir.absolute()).as_posix()


ARCHIVE_FOLDERS = tuple(f"{i:02x}" for i in range(256))
"""The archive's ``ab/`` folders (the first two hex digits of a SHA-256), made in this order:
the last one there says they all are."""


def prepare_archive(settings: Settings) -> None:
    """The archive, private, and its 256 ``ab/`` folders, made 0700 before intake takes a
    file, so a burst's first files do not each make one on their way. Measured on a new
    archive's first burst of 500 files (about 220 new folders): 1.6-1.7 ms of the watcher's
    CPU a file against 0.9-1.0 ms with the folders there (a folder made on the way is a failed
    rename, a mkdir, two chmods and the rename again). With the last folder there this is one
    stat. Folders that exist are left as they are; a full disk leaves the rest to be made on
    the way (intake then says the disk is full, once a pass) and to the next call; a folder
    removed later is made again where it is missed."""
    archive = settings.archive_dir.absolute()
    private_dirs(archive, archive)
    if (archive / ARCHIVE_FOLDERS[-1]).is_dir():
        return
    for name in ARCHIVE_FOLDERS:
        folder = archive / name
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return
            raise
        os.chmod(folder, 0o700)  # not the umask's choice


def into_archive(settings: Settings, tmp: Path, target: Path) -> None:
    """Rename a temp file in the archive to its content's name; if its ``ab/`` folder is gone,
    make it again (private) first. No temp file is left behind when that fails (a full disk)."""
    try:
        os.replace(tmp, target)
    except FileNotFoundError:
        try:
            private_dirs(settings.archive_dir, target.parent)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def private_dirs(root: Path, target_dir: Path) -> None:
    """Create ``target_dir`` and make it and its parents up to ``root`` private (0700)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    current = target_dir
    while True:
        os.chmod(current, 0o700)
        if current == root or root not in current.parents:
            break
        current = current.parent


def move(src: Path, dst: Path) -> None:
    """Atomic rename; across filesystems copy to a temp name beside ``dst``, then rename."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        src.unlink()


def stored_file(settings: Settings, stored_path: str | None) -> Path | None:
    """The archived file for a row, or its copy in rejected/ when a twin was rejected first."""
    if not stored_path:
        return None
    path = Path(stored_path)
    if not path.is_absolute():
        path = settings.data_dir.absolute() / path
    if path.is_file():
        return path
    twin = settings.rejected_dir / path.name
    return twin if twin.is_file() else None


def reject_archived(settings: Settings, path: Path) -> str:
    """Move an archived file that failed to decode into rejected/ under its archive name;
    returns its new stored path."""
    private_dirs(settings.rejected_dir, settings.rejected_dir)
    target = settings.rejected_dir / path.name
    if path != target:
        move(path, target)
    os.chmod(target, 0o600)
    return relative_to_data(settings, target)


NAME_MAX_BYTES = 255
"""The longest file name most filesystems take, in bytes."""


LEFT_IN_INBOX = "inbox-left"
"""In the data dir: one line per file recorded but left in the inbox (its identity)."""
_left: dict[Path, set[tuple[int, ...]]] = {}
_left_lock = threading.Lock()


def left_in_inbox_key(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one version of one file: a new copy, or a rewrite, is another file."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def left_in_inbox(settings: Settings) -> set[tuple[int, ...]]:
    """The files recorded but left in the inbox, by identity (read once per process)."""
    path = settings.data_dir.absolute() / LEFT_IN_INBOX
    with _left_lock:
        if path not in _left:
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            _left[path] = {tuple(int(v) for v in line.split()) for line in lines
                           if len(line.split()) == 5 and line.replace(" ", "").isdigit()}
        return _left[path]


def note_left_in_inbox(settings: Settings, key: tuple[int, ...]) -> None:
    """Remember (here and on disk) that this file is recorded though it stays in the inbox."""
    keys = left_in_inbox(settings)
    with _left_lock:
        if key in keys:
            return
        keys.add(key)
        line = (" ".join(map(str, key)) + "\n").encode()
        try:
            fd = os.open(settings.data_dir.absolute() / LEFT_IN_INBOX, os.O_WRONLY | os.O_APPEND
                         | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:  # a full disk: this process still knows; a restart records it once more
            pass


def rejected_name(base_name: str) -> str:
    """The name in rejected/ of an inbox entry that was never read: ``<random>-<name>``, the
    name as valid UTF-8 (other bytes become ``_``) and cut to fit ``NAME_MAX_BYTES``, keeping
    its extension: a 255-byte name in the inbox must still fit with its prefix."""
    clean = base_name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    clean = clean.replace("\ufffd", "_").replace("/", "_")
    prefix = f"{uuid.uuid4().hex[:12]}-"
    room = NAME_MAX_BYTES - len(prefix)
    if len(clean.encode()) > room:
        stem, dot, ext = clean.rpartition(".")
        tail = f".{ext}" if dot and stem and len(ext.encode()) <= 16 else ""
        head = clean[: len(clean) - len(tail)].encode()[: room - len(tail.encode())]
        clean = head.decode("utf-8", "ignore") + tail
    return prefix + clean
