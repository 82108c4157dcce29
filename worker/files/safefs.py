"""File operations on a folder that strangers write: handles, never paths twice.

The inbox is untrusted. Between two system calls on the same path, anyone who can write there
may swap a file or a folder for a link. So every inbox entry is reached through directory
handles opened one component at a time with ``O_NOFOLLOW`` (a swapped-in link makes the open
fail), the file is opened once without following links, checked on its handle (``fstat``), and
hashed and copied from that same handle. The entry is removed only if the name still points at
the very file that was copied (same device and inode), relative to the same directory handle.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.imaging.checksum import CHUNK, new_digest

_ZEROS = bytes(CHUNK)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Unreachable(Exception):
    """A folder on the way is gone, not a folder, or a link: the entry is not in the inbox."""


class InboxMoved(Exception):
    """The inbox path is a link, or no longer the folder the watcher holds: take nothing."""


Identity = tuple[int, int]
"""(st_dev, st_ino) of a folder."""


def open_root(root: Path, expect: Identity | None = None) -> int:
    """A handle on the inbox folder itself, its last component opened without following a
    link; with ``expect``, it must still be that very folder. Raises ``InboxMoved``."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InboxMoved(f"the inbox {root} is a link or not a folder") from None
        raise
    if expect is not None and identity(os.fstat(fd)) != expect:
        os.close(fd)
        raise InboxMoved(f"the inbox {root} is no longer the folder the watcher started on")
    return fd


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def open_folder(root: int, parts: Sequence[str]) -> int:
    """A handle on ``parts...`` below the ``root`` handle, opening each component without
    following links."""
    fd = os.dup(root)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise Unreachable(f"path component {part!r}")
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise Unreachable(str(exc.strerror)) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class Folders:
    """Handles on the folders of one intake pass, each opened once (``open_folder``) and shared
    by every file taken from it, then closed together: a burst into one folder costs one
    open, not one per file. The inbox itself is opened once, without following a link (and
    checked to be ``expect``, the folder the watcher holds, when given)."""

    def __init__(self, root: Path, expect: Identity | None = None):
        self.root = root
        self._root_fd = open_root(root, expect)
        self._fds: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def open(self, parts: Sequence[str]) -> int:
        """The handle on ``root/parts...``; raises ``Unreachable`` like ``open_folder``."""
        key = tuple(parts)
        with self._lock:
            if key not in self._fds:
                self._fds[key] = open_folder(self._root_fd, key)
            return self._fds[key]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1

    def __enter__(self) -> Folders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Entry:
    """An inbox file opened through ``folder`` (a directory handle) as ``name``."""

    folder: int
    name: str
    fd: int
    st: os.stat_result

    def changed(self) -> bool:
        """True when the file grew or was rewritten since it was opened (a writer is busy)."""
        now = os.fstat(self.fd)
        return (now.st_size, now.st_mtime_ns) != (self.st.st_size, self.st.st_mtime_ns)

    def close(self) -> None:
        os.close(self.fd)


def open_entry(folder: int, name: str) -> Entry | None:
    """Open ``name`` in ``folder`` once, without following a link; None (never opened) when
    it is not a regular file: a FIFO, socket or device node is never opened, since opening
    one has side effects. Raises OSError (ELOOP for a link, EACCES when unreadable, ENOENT
    when gone)."""
    st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
    if not stat.S_ISREG(st.st_mode):
        return None
    # O_NONBLOCK|O_NOFOLLOW as a belt: an entry swapped since the stat neither blocks nor
    # leads out; the caller checks the handle's own fstat.
    fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
    return Entry(folder, name, fd, os.fstat(fd))


def is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def hash_entry(entry: Entry) -> tuple[str, int]:
    """(sha256, bytes) of the opened file, read from its handle."""
    digest, size = new_digest(), 0
    os.lseek(entry.fd, 0, os.SEEK_SET)
    while chunk := os.read(entry.fd, CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def link_entry(entry: Entry, dest_dir: Path, dest_fd: int | None = None) -> Path | None:
    """A second name for the opened file in ``dest_dir`` (``dest_fd``: a handle on it, if the
    caller holds one), made without copying and checked to be the very file opened. None where
    no link can be made (another filesystem, a file of another user under
    ``protected_hardlinks``) or the entry was swapped meanwhile."""
    tmp = dest_dir / f".incoming-{uuid.uuid4().hex}.tmp"
    dest = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if dest_fd is None \
        else dest_fd
    try:
        os.link(entry.name, tmp.name, src_dir_fd=entry.folder, dst_dir_fd=dest,
                follow_symlinks=False)
        linked = os.stat(tmp.name, dir_fd=dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOENT):
            return None
        raise
    finally:
        if dest_fd is None:
            os.close(dest)
    if not same_file(linked, entry.st):
        tmp.unlink()
        return None
    os.fchmod(entry.fd, 0o600)
    return tmp


def copy_hashing(entry: Entry, dest_dir: Path) -> tuple[Path, str, int]:
    """Copy the opened file into a new private temp file in ``dest_dir`` while hashing it, in one
    pass over the handle; returns (temp path, sha256, bytes). No temp file survives an error.
    Runs of zeros stay holes, so ``truncate -s 250M`` costs the archive no disk."""
    tmp = dest_dir / f".incoming-{uuid.uuid4().hex}.tmp"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    digest, size = new_digest(), 0
    try:
        os.lseek(entry.fd, 0, os.SEEK_SET)
        while chunk := os.read(entry.fd, CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if chunk == _ZEROS[:len(chunk)]:  # a hole (or zeros): leave one in the copy too
                os.lseek(out, len(chunk), os.SEEK_CUR)
                continue
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
        os.ftruncate(out, size)
    except BaseException:
        os.close(out)
        tmp.unlink(missing_ok=True)
        raise
    os.close(out)
    return tmp, digest.hexdigest(), size


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_entry(folder: int, name: str, expected: os.stat_result) -> bool:
    """Unlink ``name`` from ``folder`` if it is still the file described by ``expected``."""
    try:
        current = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not same_file(current, expected):
        return False
    os.unlink(name, dir_fd=folder)
    return True


def move_entry(folder: int, name: str, dest_dir: Path, dest_name: str) -> bool:
    """Rename the entry itself (a link stays a link; no read needed) into ``dest_dir``.

    False when ``dest_dir`` is on another filesystem: the entry then stays where it is. Any
    other failure (a folder the service may not write, a name too long) raises OSError.
    """
    dest = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.rename(name, dest_name, src_dir_fd=folder, dst_dir_fd=dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    finally:
        os.close(dest)
    return True
