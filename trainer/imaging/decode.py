"""Turn an X-ray file into the model's input: a square uint8 RGB array, or a reason why not.

Every image the service sees passes through here, so every way a file can be wrong ends as a
``BadImageError`` whose message is a short reason a user can act on (it is stored as the result's
``error``). Reasons name the file's real format, never its path.

Choices that matter for the model:

* JPEG and PNG are decoded by Pillow (restricted to those two plugins), except the service's
  own draft-mode resize of a grey or YCbCr JPEG: libjpeg-turbo in one call through simplejpeg,
  with Pillow's pixels (``trainer.imaging.jpeg_draft``, which says why). DICOM is decoded by
  ``trainer.imaging.dicom`` (a viewer's display pipeline down to 8-bit grey, then the same path as a
  JPEG from here on); the real format is told from the content, not the extension, so a GIF
  named ``.jpg`` is reported as a GIF and a DICOM needs no ``.dcm``.
* The pixel count declared in the header is checked against ``max_pixels`` before any pixel is
  decoded (decompression bombs), and truncated files are rejected, never padded with grey.
* X-rays carry no colour. Every mode is reduced to 8-bit luminance and replicated to three
  channels, so a colour cast, a CMYK export or an odd channel order cannot change a prediction,
  and the trained RGB backbones still get the input shape they expect.
* 16-bit greyscale is stretched over its actual range (min..max to 0..255): X-ray PNGs often hold
  10-12 bit data, which a plain ``>> 8`` would turn nearly black and Pillow's ``convert("L")``
  would clip to white.
* Transparent pixels are composited on black (the background of a radiograph).
* The EXIF orientation is applied, so a rotated phone capture reaches the model upright.
* The image is squashed to ``size x size`` with Pillow's antialiased bilinear filter. The
  trainer's input pipeline calls this same function, so a model sees the same pixels in training
  and in serving.
* Large JPEGs are decoded at a reduced DCT scale (draft mode) that still leaves at least twice the
  output resolution, which makes a 4000x4000 file several times faster to decode.
* That resize (``SERVICE_RESIZE``) is what this project's own models are trained on. A model
  trained elsewhere declares its own (``resize``, one of ``RESIZE_FILTERS``): the full image is
  decoded (draft mode changes every pixel) and squashed with that Pillow filter, as
  ``keras.utils.load_img`` does, so it gets the pixels it was trained on.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from db.exceptions import BadImageError
from db.identifiers import DicomIdentifiers
from trainer.imaging.dicom import looks_like_dicom, read_dicom
from trainer.imaging.jpeg_draft import draft_in_one_call

MIN_SIDE = 32
"""Smallest accepted width or height. Below this a file is an icon or a placeholder, not a
radiograph; the number is fixed (not a setting) because no real X-ray comes close to it."""

PILLOW_FORMATS = ("JPEG", "PNG")
SUPPORTED_FORMATS = (*PILLOW_FORMATS, "DICOM")
_CLAIMED_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".dcm", ".dicom")
_HEAD_BYTES = 512
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
STRETCH_BLOCK_PIXELS = 1 << 20

SERVICE_RESIZE = "draft_bilinear"
"""JPEG draft mode down to about twice the output size, then Pillow's antialiased bilinear: how
this project's trainer and workers feed its own models (the default of old manifests)."""
RESIZE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
"""Declared resize methods, each Pillow's filter of that name applied to the fully decoded
image (as ``keras.utils.load_img(interpolation=...)``; "area" is Pillow's box filter)."""
RESIZE_METHODS = (SERVICE_RESIZE, *RESIZE_FILTERS)


class Feed(NamedTuple):
    """How a model wants its pixels: square side and resize method (``RESIZE_METHODS``).
    Two stages with equal feeds can share decoded pixels; any difference means decoding again."""

    size: int
    resize: str = SERVICE_RESIZE


def check_resize(resize: str) -> str:
    """``resize`` if it is one of ``RESIZE_METHODS``, else ValueError."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_METHODS)}, got {resize!r}")
    return resize


def sniff_bytes(head: bytes) -> str | None:
    """Name a file's format from its first bytes (132 needed for DICOM, 512 best); None if
    unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 14:
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if looks_like_dicom(head):
        return "DICOM"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    for magic, name in ((b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
                        (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO")):
        if head.startswith(magic):
            return name
    return _sniff_text(head)


def _sniff_text(head: bytes) -> str | None:
    if not head or b"\x00" in head:
        return None
    text = head.decode("utf-8", errors="replace")
    controls = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f"))
    if controls > len(text) * 0.05:
        return None
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in start:
        return "HTML"
    if "<svg" in start:
        return "SVG"
    if start.startswith("<?xml"):
        return "XML"
    return "text"


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or JPEG SOF header without decoding; None if absent."""
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


@dataclass(frozen=True)
class Decoded:
    """What the model sees, and a DICOM's identifiers and ViewPosition (None for JPEG and PNG;
    the worker applies ``CXR_UNKNOWN_VIEW`` to the view: ``trainer.imaging.dicom.view_policy``)."""

    pixels: np.ndarray
    identifiers: DicomIdentifiers | None = None
    view: str | None = None


def decode_image(path: Path, size: int, max_pixels: int, resize: str = SERVICE_RESIZE
                 ) -> np.ndarray:
    """Decode the JPEG, PNG or DICOM at ``path`` to a ``(size, size, 3)`` uint8 RGB array
    (grey x 3).

    Raises BadImageError with a short reason for anything that is not a sound, supported image.
    """
    return decode_file(path, size, max_pixels, resize).pixels


def decode_file(path: Path, size: int, max_pixels: int, resize: str = SERVICE_RESIZE
                ) -> Decoded:
    """``decode_image`` with the identifiers of a DICOM beside its pixels."""
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise BadImageError("empty file (0 bytes)")
            return _decode_stream(fp, Feed(size, resize), max_pixels, path.suffix)
    except IsADirectoryError:
        raise BadImageError("is a directory, not a file") from None
    except PermissionError:
        raise BadImageError("permission denied (the service cannot read the file)") from None
    except FileNotFoundError:
        raise BadImageError("file vanished before it could be read") from None
    except BadImageError:
        raise
    except OSError as exc:
        raise BadImageError(f"cannot read file: {exc.strerror or exc}") from None


def decode_bytes(data: bytes, size: int, max_pixels: int, name: str = "",
                 resize: str = SERVICE_RESIZE) -> np.ndarray:
    """Same as ``decode_image`` for an image already in memory; ``name`` only improves reasons."""
    return decode_data(data, size, max_pixels, name, resize).pixels


def decode_data(data: bytes, size: int, max_pixels: int, name: str = "",
                resize: str = SERVICE_RESIZE) -> Decoded:
    """``decode_bytes`` with the identifiers of a DICOM beside its pixels."""
    if not data:
        raise BadImageError("empty file (0 bytes)")
    return _decode_stream(io.BytesIO(data), Feed(size, resize), max_pixels, Path(name).suffix)


def decode_many(
    paths: Sequence[Path], size: int, max_pixels: int, threads: int = 4,
    resize: str = SERVICE_RESIZE,
) -> list[Decoded | BadImageError]:
    """Decode files in a thread pool (Pillow releases the GIL), results in input order.

    A bad file yields its BadImageError in its slot and never affects the others.
    """

    def one(path: Path) -> Decoded | BadImageError:
        try:
            return decode_file(path, size, max_pixels, resize)
        except BadImageError as exc:
            return exc

    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(one, paths))


def _decode_stream(fp: BinaryIO, feed: Feed, max_pixels: int, suffix: str) -> Decoded:
    check_resize(feed.resize)
    head = fp.read(_HEAD_BYTES)
    fmt = sniff_bytes(head)
    _check_format(fmt, suffix)
    assert fmt is not None
    if fmt == "DICOM":
        return _decode_dicom(fp, feed, max_pixels)
    if fmt == "PNG":
        _verify_png(fp)
    fp.seek(0)
    try:
        with Image.open(fp, formats=list(PILLOW_FORMATS)) as img:
            _check_dimensions(img.size, max_pixels)
            if feed.resize == SERVICE_RESIZE:  # a declared filter needs every decoded pixel
                gray = draft_in_one_call(fp, img, feed.size)
                if gray is not None:
                    return Decoded(_model_input(gray, feed))
                img.draft("L", (feed.size * 2, feed.size * 2))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # the same pixels, no copy
            return Decoded(_model_input(_to_gray(img), feed))
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        fp.seek(0)
        declared = declared_size(fp.read(1 << 20))
        raise BadImageError(_too_large(declared, max_pixels)) from None
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure is a property of the file
        raise BadImageError(_pillow_reason(fmt, exc)) from None


def _decode_dicom(fp: BinaryIO, feed: Feed, max_pixels: int) -> Decoded:
    """DICOM header checks, then the pixel limit before any pixel is decoded, then the same
    resize as every other format. Rejections keep the identifiers once they are known."""
    image = None
    try:
        image = read_dicom(fp, max_pixels)
        _check_dimensions(image.size, max_pixels)
        gray = Image.fromarray(image.gray8())
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure is a property of the file
        reason = str(exc) if isinstance(exc, BadImageError) else (
            f"corrupt DICOM ({type(exc).__name__})")
        known = image.identifiers if image else getattr(exc, "identifiers", None)
        raise BadImageError(reason, known) from None
    return Decoded(_model_input(gray, feed), image.identifiers, image.view)


def _model_input(gray: Image.Image, feed: Feed) -> np.ndarray:
    """8-bit grey of any format -> ``(size, size, 3)`` uint8: resized, then grey x 3 (a
    greyscale model takes one of the three, see ``trainer.model.bundle``)."""
    size = feed.size
    if gray.size != (size, size):
        method = RESIZE_FILTERS.get(feed.resize, Image.Resampling.BILINEAR)
        gray = gray.resize((size, size), method)
    pixels = np.asarray(gray, dtype=np.uint8)
    return np.stack((pixels, pixels, pixels), axis=-1)  # half the time of np.repeat on axis 2


def _check_format(fmt: str | None, suffix: str) -> None:
    if fmt in SUPPORTED_FORMATS:
        return
    claimed = suffix.lower() in _CLAIMED_SUFFIXES
    named = f", although named {suffix}" if claimed else ""
    if fmt in ("HTML", "text", "XML", "SVG"):
        raise BadImageError(f"not an image: looks like {fmt}{named}")
    if fmt is None:
        raise BadImageError(f"not a JPEG, PNG or DICOM image: unrecognised content{named}")
    raise BadImageError(f"unsupported format {fmt} (JPEG, PNG and DICOM only){named}")


def _check_dimensions(dims: tuple[int, int], max_pixels: int) -> None:
    width, height = dims
    if width * height > max_pixels:
        raise BadImageError(_too_large(dims, max_pixels))
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadImageError(
            f"image too small: {width}x{height} pixels (minimum {MIN_SIDE}x{MIN_SIDE})"
        )


def _too_large(dims: tuple[int, int] | None, max_pixels: int) -> str:
    what = f"{dims[0]}x{dims[1]} pixels" if dims else "declared size"
    return (
        f"image too large: {what} exceeds the limit of {max_pixels:,}"
        " (possible decompression bomb)"
    )


def _verify_png(fp: BinaryIO) -> None:
    """Check every chunk's CRC, streaming: Pillow's decoder skips the IDAT checksums. An
    animated PNG is refused like a GIF or a multi-frame DICOM (Pillow would read its first
    frame): its ``acTL`` chunk holds the frame count Pillow's ``n_frames`` reports."""
    fp.seek(len(PNG_MAGIC))
    while True:
        header = fp.read(8)
        if len(header) < 8:
            raise BadImageError("truncated PNG (the file ends early)")
        length, kind = struct.unpack(">I", header[:4])[0], header[4:]
        crc = zlib.crc32(kind)
        remaining, first = length, b""
        while remaining:
            block = fp.read(min(remaining, 1 << 20))
            if not block:
                raise BadImageError("truncated PNG (the file ends early)")
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
            first = first or block[:4]
        stored = fp.read(4)
        if len(stored) < 4:
            raise BadImageError("truncated PNG (the file ends early)")
        if struct.unpack(">I", stored)[0] != crc:
            name = kind.decode("latin-1") if kind.isalpha() else "?"
            raise BadImageError(f"corrupt PNG (bad CRC in {name} chunk)")
        frames = struct.unpack(">I", first)[0] if kind == b"acTL" and len(first) == 4 else 1
        if frames > 1:
            raise BadImageError(f"animated PNG ({frames} frames): send single-frame images")
        if kind == b"IEND":
            return


def _pillow_reason(fmt: str, exc: Exception) -> str:
    message = str(exc)
    lowered = message.lower()
    if isinstance(exc, UnidentifiedImageError):
        return f"corrupt or truncated {fmt}: the header cannot be read"
    if "truncated" in lowered or isinstance(exc, EOFError) or "end of file" in lowered:
        return f"truncated {fmt} (the file ends early)"
    if "checksum" in lowered or "crc" in lowered:
        return f"corrupt {fmt} (bad CRC)"
    message = re.sub(r"[\r\n]+", " ", message)[:120]
    return f"corrupt {fmt} ({type(exc).__name__}: {message})" if message else f"corrupt {fmt}"


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit luminance of any Pillow mode JPEG/PNG produce; alpha composited on black."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _stretch_to_8bit(np.asarray(img))
    if img.mode == "L" and "transparency" not in img.info:
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if img.mode in ("1", "RGB", "RGBX", "P"):
        return img.convert("L")
    return img.convert("RGB").convert("L")


def _stretch_to_8bit(values: np.ndarray) -> Image.Image:
    """Map [min, max] to [0, 255] in row blocks of float32, never a float64 copy of the whole
    image (a 60-megapixel 16-bit PNG would otherwise need about 1.5 GiB here)."""
    lo, hi = int(values.min()), int(values.max())
    out = np.zeros(values.shape, dtype=np.uint8)
    if hi > lo:
        scale = np.float32(255.0 / (hi - lo))
        rows = max(1, STRETCH_BLOCK_PIXELS // max(1, values.shape[1]))
        for start in range(0, values.shape[0], rows):
            block = values[start:start + rows].astype(np.float32)
            block -= lo
            block *= scale
            np.rint(block, out=block)
            out[start:start + rows] = block
    return Image.fromarray(out)
