"""The one way a file's SHA-256 is computed: archive names, duplicate detection, bundle and
data set fingerprints all depend on every caller hashing the same bytes the same way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def new_digest() -> hashlib._Hash:
    """An empty SHA-256, for callers that feed it as they read (intake copies while hashing)."""
    return hashlib.sha256()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes already in memory."""
    return hashlib.sha256(data).hexdigest()


def hash_stream(fh: BinaryIO, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    """Feed everything left in ``fh`` into ``digest`` (a new SHA-256 by default)."""
    digest = digest or new_digest()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
    return digest


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of the file's content."""
    with open(path, "rb") as fh:
        return hash_stream(fh).hexdigest()
