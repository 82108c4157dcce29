"""The service's own JPEG path (draft mode to grey) in one C call instead of Pillow's.

Nearly every file the service and the trainer see is a grey or YCbCr JPEG decoded in draft mode
(``trainer.imaging.decode.SERVICE_RESIZE``). Pillow spends part of that decode in Python (its
marker parser, the block loop around the decoder), holding the GIL that the other decoding
threads and the forward pass need. simplejpeg hands the whole file to libjpeg-turbo in one call
that releases the GIL, at the DCT scale Pillow's ``draft`` picks and with the same integer
IDCT and luminance plane, so the pixels are Pillow's (``tests/test_jpeg_draft.py`` compares
them). Every other case returns None and takes Pillow's path: an EXIF segment (an orientation
to apply), CMYK or YCCK, 12-bit, lossless or arithmetic-coded files, anything libjpeg warns
about (a truncated or damaged file), files over Pillow's own pixel limit. So Pillow alone names
what is wrong with a bad file, and the reasons do not depend on this module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

GREY_SOURCES = ("Gray", "YCbCr")
"""Colour spaces whose grey is their luminance plane as stored, as Pillow's ``draft("L")``
asks libjpeg for it."""
_EXIF = b"Exif\x00\x00"


class JpegHeader(NamedTuple):
    width: int
    height: int
    colourspace: str
    """libjpeg's name for the stored colour space (``Gray``, ``YCbCr``, ``CMYK`` ...)."""


def read_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG libjpeg can parse, else None (Pillow will say why)."""
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return JpegHeader(width, height, colourspace)


def draft_gray(data: bytes, header: JpegHeader, size: int) -> np.ndarray | None:
    """``(h, w)`` uint8 grey as Pillow's ``draft("L", (2 * size, 2 * size))`` and ``load()``
    give it, or None where Pillow must decode (see the module's docstring). It decodes whatever
    it is given: check ``header`` against the pixel limit first."""
    limit = Image.MAX_IMAGE_PIXELS
    if header.colourspace not in GREY_SOURCES or (limit and header.width * header.height > limit):
        return None
    if _has_exif(data):
        return None
    scale = draft_scale(header.width, header.height, 2 * size)
    shape = (-(-header.height // scale), -(-header.width // scale))
    try:  # the smallest of libjpeg's scales leaving at least ``shape`` is exactly 1 / scale
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=shape[0],
                                        min_width=shape[1], strict=True)
    except ValueError:
        return None
    if pixels.shape[:2] != shape:
        return None
    return pixels.reshape(shape)


def draft_scale(width: int, height: int, side: int) -> int:
    """The DCT scale Pillow's ``JpegImageFile.draft`` picks for a ``side`` x ``side`` request:
    the largest of 8, 4, 2 and 1 that leaves both sides at least ``side``."""
    room = min(width // side, height // side)
    return next((s for s in (8, 4, 2) if room >= s), 1)


def _has_exif(data: bytes) -> bool:
    """Whether an APP1 segment before the scan holds EXIF (an orientation Pillow would apply);
    True also where the markers cannot be walked, so that Pillow judges the file."""
    for marker, pos in markers(data):
        if marker == BROKEN or (marker == 0xE1 and data[pos + 4:pos + 10] == _EXIF):
            return True
        if marker == 0xDA:
            return False
    return True


BROKEN = -1
"""What ``markers`` yields where the bytes are not a marker."""


def markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, offset) of each marker after a JPEG's SOI, up to its first scan (SOS); then
    ``BROKEN`` and nothing more where the bytes are not a marker (a damaged header)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            yield BROKEN, pos
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        yield marker, pos
        if marker == 0xDA:
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length follows these
            pos += 2
        else:
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
