"""Which inbox names are worth taking: junk and half-written temp files are left alone.

Decoding decides whether a file is a supported image; this only skips names that are never
a finished upload (browser downloads in progress, editor backups, OS metadata).

One rule for the events and the scan: nothing under a hidden folder is taken (rsync's
``--delay-updates`` staging folder ``.~tmp~``, ``.rsync-partial``, a ``.git``), nor a hidden
file (rsync's temp names ``.name.XXXXXX``).
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


def is_walked_folder(name: str) -> bool:
    """True when a folder of this name is looked into (hidden folders are not)."""
    return bool(name) and not name.startswith(".")


def _parts(inbox: Path, path: Path | str) -> tuple[str, ...]:
    try:
        return Path(path).relative_to(inbox).parts
    except ValueError:
        return ()


def is_walked_in(inbox: Path, folder: Path | str) -> bool:
    """True when ``folder``, below ``inbox``, and every folder on the way are looked into."""
    parts = _parts(inbox, folder)
    return bool(parts) and all(is_walked_folder(p) for p in parts)


def is_candidate_in(inbox: Path, path: Path | str, max_depth: int | None = None) -> bool:
    """``is_candidate`` for a path below ``inbox``, also refusing it when a folder on the way
    is hidden or it lies more than ``max_depth`` folders deep (the scan never walks those);
    False for a path not below the inbox."""
    parts = _parts(inbox, path)
    if not parts or not all(is_walked_folder(p) for p in parts[:-1]):
        return False
    if max_depth is not None and len(parts) - 1 > max_depth:
        return False
    return is_candidate(parts[-1])
