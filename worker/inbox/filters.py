"""Which inbox names are worth taking: junk and half-written temp files are left alone.

Decoding decides whether a file is a supported image; this only skips names that are never
a finished upload (browser downloads in progress, editor backups, OS metadata).
"""

from __future__ import annotations

from pathlib import Path

TEMP_SUFFIXES = frozenset(
    {".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", ".filepart"}
)
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


def is_candidate(path: Path | str) -> bool:
    """True when the file name looks like a finished upload (not a dotfile, temp or junk name)."""
    name = Path(path).name
    if not name or name.startswith(".") or name.endswith("~"):
        return False
    if name.lower() in JUNK_NAMES:
        return False
    return Path(name).suffix.lower() not in TEMP_SUFFIXES
