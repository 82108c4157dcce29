"""The service's own JPEG resize (draft mode to grey) in one C call instead of Pillow's loop.

Nearly every file the service and the trainer see is a grey or YCbCr JPEG decoded in draft mode
(``trainer.imaging.decode.SERVICE_RESIZE``). Pillow hands such a file to libjpeg-turbo block by
block from Python, holding the GIL that the other decoding threads and the forward pass need
between blocks. simplejpeg hands it over in one call that releases the GIL, at the DCT scale
Pillow's ``draft`` picks, with the same integer IDCT and luminance plane, so the pixels are
Pillow's (``tests/test_jpeg_draft.py`` compares them).

``trainer.imaging.decode`` calls this only after Pillow has read and accepted the header, the
pixel limit is checked and no EXIF or XMP orientation applies, so the reasons a bad file is
refused for do not change. Whatever else this does not take returns None and Pillow decodes
it as before: colour spaces other than grey and YCbCr, and anything libjpeg warns about (a
damaged or truncated file).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import BinaryIO

import numpy as np
import simplejpeg
from PIL import ExifTags, Image

log = logging.getLogger(__name__)

WHOLE_READ_MAX = 64 << 20
"""Largest file read whole for this path; a larger one streams through Pillow."""
GREY_SOURCES = ("Gray", "YCbCr")
"""Colour spaces whose grey is their stored luminance plane, which Pillow's ``draft("L")``
asks libjpeg for."""


def draft_in_one_call(fp: BinaryIO, img: Image.Image, size: int) -> Image.Image | None:
    """Draft mode's grey for the image Pillow opened from ``fp`` (its header read and accepted,
    the pixel limit checked), or None where Pillow decodes: not a grey or YCbCr JPEG, an
    orientation to apply, a file too large to read whole, anything libjpeg warns about."""
    if img.format != "JPEG" or _turned(img) or not agrees():
        return None
    data = _whole(fp)
    gray = draft_gray(data, size) if data is not None else None
    return None if gray is None else Image.fromarray(gray)


def _turned(img: Image.Image) -> bool:
    """Whether ``ImageOps.exif_transpose`` would turn the image (EXIF or XMP orientation); True
    where the metadata cannot be read, so that Pillow's path meets it where it did before."""
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
    except Exception:
        return True


def _whole(fp: BinaryIO) -> bytes | None:
    """The stream's bytes, without a copy where it already holds them; None for a file over
    ``WHOLE_READ_MAX``."""
    if isinstance(fp, io.BytesIO):
        return fp.getvalue()
    if os.fstat(fp.fileno()).st_size > WHOLE_READ_MAX:
        return None
    fp.seek(0)
    return fp.read()


def draft_gray(data: bytes, size: int) -> np.ndarray | None:
    """``(h, w)`` uint8 grey as Pillow's ``draft("L", (2 * size, 2 * size))`` and ``load()``
    give it, or None where Pillow must decode (see the module's docstring)."""
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        if colourspace not in GREY_SOURCES:
            return None
        scale = draft_scale(width, height, 2 * size)
        shape = (-(-height // scale), -(-width // scale))
        # the smallest of libjpeg's scales leaving at least ``shape`` is exactly 1 / scale
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=shape[0],
                                        min_width=shape[1], strict=True)
    except MemoryError:
        raise
    except Exception:  # ValueError for what libjpeg refuses or warns about: Pillow judges it
        return None
    return pixels.reshape(shape) if pixels.shape[:2] == shape else None


def draft_scale(width: int, height: int, side: int) -> int:
    """The DCT scale Pillow's ``JpegImageFile.draft`` picks for a ``side`` x ``side`` request:
    the largest of 8, 4, 2 and 1 that leaves both sides at least ``side``."""
    room = min(width // side, height // side)
    return next((s for s in (8, 4, 2) if room >= s), 1)


@functools.cache
def agrees() -> bool:
    """Whether simplejpeg's libjpeg-turbo gives Pillow's draft pixels on this installation
    (each bundles its own build, and a wheel upgrade could change one): checked once a
    process on a grey and a YCbCr JPEG; if not, Pillow decodes everything, with a warning."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 300)[None, :] + rng.integers(0, 55, (260, 300))
    grey = ramp.astype(np.uint8)
    colour = np.stack([grey, grey[::-1], rng.integers(0, 255, grey.shape)], -1).astype(np.uint8)
    for pixels, options in ((grey, {"progressive": True}), (colour, {"subsampling": 2})):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90, **options)
        data = out.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (64, 64))
            want = np.asarray(img.convert("L"))
        got = draft_gray(data, 32)
        if got is None or not np.array_equal(got, want):
            log.warning("simplejpeg %s does not decode JPEGs to Pillow's pixels here; Pillow "
                        "decodes them all (slower, the same results)", simplejpeg.__version__)
            return False
    return True
