"""Reading an archived image back: the one place that opens an archived file, checks it is the
content intake hashed, and decodes it within a memory budget.

Every byte of a file is hashed. A file that fits in one read (nearly every image) is read and
kept in one call, whatever trails the image included: that is at most ``HEAD_BYTES`` +
``READ_CHUNK``, and the decoders stop at the image's end. A larger file streams, and only the
image's own bytes are kept: data after a JPEG's EOI or a PNG's IEND is hashed and dropped, never
held beyond one read of at most ``READ_CHUNK``. The bytes are dropped once both stages' pixels
are decoded, so a message holds pixels, not files.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from db.claims import Claim
from db.exceptions import BadImageError
from db.identifiers import DicomIdentifiers
from trainer.imaging.budget import MemoryBudget, decode_cost
from trainer.imaging.checksum import new_digest, sha256_bytes
from trainer.imaging.decode import SUPPORTED_FORMATS, Feed, decode_bytes, decode_data, sniff_bytes
from trainer.imaging.dicom_terms import view_policy
from trainer.imaging.extent import EndFinder
from trainer.model.gate import check_file_colour
from trainer.model.refusal import Refusal
from worker.files.storage import stored_file
from worker.settings import Settings

HEAD_BYTES = 1 << 16
"""Bytes read first: enough to name the format and read the declared size of most images."""
READ_CHUNK = 1 << 20
"""Bytes read (and hashed) at a time; in a file larger than one read, trailing data after an
image never stays longer."""
CHANGED = ("the archived file changed after intake (its SHA-256 no longer matches what was "
           "received); not classified")


@dataclass
class Read:
    """One claimed image after reading: pixels for each stage, or why not."""

    claim: Claim
    pixels: np.ndarray | None = None
    second: np.ndarray | None = None
    """Stage 2's pixels (the same array when both stages take the same feed)."""
    rejected: str | None = None
    missing: bool = False
    identifiers: DicomIdentifiers | None = None
    """A DICOM's study, series and instance UIDs etc. (kept even when it is rejected)."""
    view: str | None = None
    note: str | None = None
    """How a done image was read, for its ``error`` column (an unknown view taken as frontal)."""
    colour: Refusal | None = None
    """The input gate's verdict on the file's own colours (the decoder keeps grey only)."""
    review: str | None = None
    gate_score: float | None = None
    """Set when the input gate refused the image (``out_of_scope``)."""


def read_claim(claim: Claim, settings: Settings, feeds: tuple[Feed, Feed],
               budget: MemoryBudget, colour: bool = False) -> Read:
    """Read, check and decode one archived file for both stages' feeds, within ``budget``;
    with ``colour`` (an input gate is on) also judge a JPEG's or PNG's own colours from the
    same checked bytes."""
    path = stored_file(settings, claim.stored_path)
    if path is None:
        return Read(claim, missing=True)
    try:
        with open(path, "rb") as fh:
            read = _read_opened(claim, fh, settings, feeds, budget, colour)
    except FileNotFoundError:
        return Read(claim, missing=True)
    except OSError as exc:
        return Read(claim, rejected=f"cannot read the archived file: {exc.strerror or exc}")
    return _view_checked(read, settings.unknown_view)


def _read_opened(claim: Claim, fh: BinaryIO, settings: Settings, feeds: tuple[Feed, Feed],
                 budget: MemoryBudget, colour: bool = False) -> Read:
    st_size = os.fstat(fh.fileno()).st_size
    if st_size > settings.max_file_bytes:
        return Read(claim, rejected=f"file too large: {st_size:,} bytes (the limit, "
                    f"CXR_MAX_FILE_BYTES, is {settings.max_file_bytes:,})")
    head = fh.read(HEAD_BYTES)
    fmt = sniff_bytes(head)
    kept = st_size if fmt in SUPPORTED_FORMATS else len(head)
    decoding = max(decode_cost(head, f.size, f.resize) for f in feeds) or 4 * kept
    cost = kept + max(kept, decoding)  # the bytes, and their one copy or the decoder's peak
    first, second = feeds
    try:
        with budget.reserve(cost):
            data = read_image_bytes(fh, head, claim.sha256, keep_all=fmt == "DICOM",
                                    keep_head_only=fmt not in SUPPORTED_FORMATS)
            if data is None:
                return Read(claim, rejected=CHANGED)
            decoded = decode_data(data, first.size, settings.max_image_pixels,
                                  name=claim.file_name, resize=first.resize)
            other = decoded.pixels if second == first else decode_bytes(
                data, second.size, settings.max_image_pixels, name=claim.file_name,
                resize=second.resize)
            tint = check_file_colour(io.BytesIO(data)) if colour and fmt != "DICOM" else None
            del data
        return Read(claim, pixels=decoded.pixels, second=other,
                    identifiers=decoded.identifiers, view=decoded.view, colour=tint)
    except BadImageError as exc:
        return Read(claim, rejected=str(exc), identifiers=exc.identifiers)


def read_image_bytes(fh: BinaryIO, head: bytes, sha256: str, keep_all: bool = False,
                     keep_head_only: bool = False) -> bytes | None:
    """The image's bytes from an open file whose first bytes ``head`` were read, None when the
    file is not ``sha256`` (what intake hashed). A file of one read is kept whole; a larger one
    is hashed in chunks and only the bytes up to the image's end (JPEG EOI, PNG IEND) are kept,
    trailing data dropped. A DICOM (``keep_all``) is kept whole; an unknown format
    (``keep_head_only``) only its head, which is all the decoder needs to name it."""
    if not keep_head_only and _size(fh) <= HEAD_BYTES + READ_CHUNK:
        return _read_whole(fh, sha256)
    digest = new_digest()
    digest.update(head)
    finder = EndFinder(head)
    buf = bytearray(head)
    end = None if keep_all else finder.feed(buf)
    while chunk := fh.read(READ_CHUNK):
        digest.update(chunk)
        if end is None and not keep_head_only:
            buf += chunk
            if not keep_all and not finder.unknown:
                end = finder.feed(buf)
    if digest.hexdigest() != sha256:
        return None
    if end is not None:
        del buf[end:]
    return bytes(buf)


def _size(fh: BinaryIO) -> float:
    """The open file's size (infinite for a stream without one: read in chunks)."""
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return float("inf")


def _read_whole(fh: BinaryIO, sha256: str) -> bytes | None:
    """``read_image_bytes`` for a file of at most ``HEAD_BYTES`` + ``READ_CHUNK`` bytes (nearly
    every image): read again from the start in one call, so the bytes hashed are the bytes
    kept, uncopied. Not trimmed: what trails the image is in memory already and reserved, the
    decoders stop at the image's end, and finding that end cost 0.15 ms an image, part of it
    holding the GIL (issue 28)."""
    fh.seek(0)
    data = fh.read(HEAD_BYTES + READ_CHUNK + 1)
    if len(data) > HEAD_BYTES + READ_CHUNK or sha256_bytes(data) != sha256:
        return None  # it grew or changed after intake
    return data


def read_archived(settings: Settings, stored_path: str | None, sha256: str
                  ) -> tuple[bytes | None, str | None]:
    """(an archived image's bytes as ``read_image_bytes`` keeps them, checked against the hash
    intake recorded) or (None, why): for one-off commands that decode an archived image again
    (cxr explain)."""
    path = stored_file(settings, stored_path)
    try:
        if path is None:
            raise FileNotFoundError(stored_path)
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
            data = read_image_bytes(fh, head, sha256,
                                    keep_all=sniff_bytes(head) not in ("JPEG", "PNG"))
    except OSError:
        return None, "its archived file is missing"
    if data is None:
        return None, "its archived file changed after intake (SHA-256 mismatch)"
    return data, None


def _view_checked(read: Read, unknown_view: str) -> Read:
    """``CXR_UNKNOWN_VIEW`` applied to a decoded DICOM whose ViewPosition is neither frontal
    nor lateral: refused, or taken with a note saying so."""
    if read.pixels is None or read.view is None:
        return read
    refused, read.note = view_policy(read.view, unknown_view)
    if refused:
        read.pixels, read.second, read.rejected = None, None, refused
    return read
