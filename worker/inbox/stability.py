"""Decides when a file in the inbox is complete, from ``stat`` alone.

Some copies announce their end (inotify close-write, a rename into the inbox); others (SMB,
NFS, polling) only show the file growing. A file is due when its size and mtime held still
either since a close/move event or over a quiet period. No watcher needed to test it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Signature = tuple[int, int]


def file_signature(path: Path) -> Signature | None:
    """(size, mtime_ns) of a regular file, or None when it is gone or not a plain file."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not _is_regular(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


@dataclass
class _Entry:
    signature: Signature
    since: float
    closed: bool


class StabilityTracker:
    """Tracks candidate files until each is complete; ``due()`` hands each one out once."""

    def __init__(self, quiet_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._entries: dict[Path, _Entry] = {}

    def __contains__(self, path: Path) -> bool:
        return Path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self, path: Path, closed: bool = False) -> None:
        """Note activity on ``path``; ``closed`` means the writer said it is finished."""
        path = Path(path)
        sig = file_signature(path)
        if sig is None:
            self._entries.pop(path, None)
            return
        entry = self._entries.get(path)
        if entry is None or entry.signature != sig:
            self._entries[path] = _Entry(sig, self._clock(), closed)
        elif closed:
            entry.closed = True

    def due(self) -> list[Path]:
        """Files complete now (removed from tracking); vanished files are dropped."""
        now = self._clock()
        ready = []
        for path, entry in list(self._entries.items()):
            sig = file_signature(path)
            if sig is None:
                del self._entries[path]
            elif sig != entry.signature:
                self._entries[path] = _Entry(sig, now, False)
            elif entry.closed or now - entry.since >= self.quiet_seconds:
                del self._entries[path]
                ready.append(path)
        return ready
