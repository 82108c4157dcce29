"""DICOM files as a radiologist's viewer shows them, for the one decoder
(``trainer.imaging.decode``).

Why each step is as it is:

* A file is DICOM by content: ``DICM`` at offset 128, or a raw data set without the preamble
  whose first elements parse as group 0002/0008 tags. The extension plays no part.
* Only the elements in ``_READ`` are parsed (pydicom's ``specific_tags``). Every other element,
  the patient's name, id and birth date among them, is skipped unread, so no header value but
  the identifiers in ``db.identifiers`` can reach a reason, a log line or the database.
* pydicom holds the data set in memory, so the file size (and, for the deflated syntax, the
  inflated size) is bounded before reading: two bytes per allowed pixel plus ``HEADER_BYTES``.
* What the header says is checked before any pixel is decoded: one frame, greyscale, 8 to 16
  bits stored, a radiograph modality (CR, DX, RG), the chest when the file names a body part,
  a frontal view (the models never saw a lateral), a transfer syntax an installed package
  decodes (the reason names the package to install). ``trainer.imaging.decode`` then checks
  the pixel count, exactly as for JPEG and PNG.
* Pixels go through the display pipeline of PS3.3 C.11: the modality LUT (rescale slope and
  intercept), then the VOI LUT, or else the first window centre and width (LINEAR,
  LINEAR_EXACT or SIGMOID), or else the full range of the values present; MONOCHROME1 is
  inverted last. The result is 8-bit grey, which ``trainer.imaging.decode`` resizes and replicates
  to RGB like any JPEG, so a DICOM and its viewer's JPEG export reach the model alike.
* Codecs: pydicom itself reads the uncompressed, deflated and RLE syntaxes; GDCM (python-gdcm)
  the JPEG family, JPEG-LS and JPEG 2000, including 12-bit JPEG Extended (``dicom_gdcm``).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from db.exceptions import BadImageError
from db.identifiers import DICOM_KEYWORDS, DicomIdentifiers
from trainer.imaging.dicom_terms import (
    BODY_PARTS,
    LATERAL_VIEWS,
    MODALITIES,
    PHOTOMETRICS,
    shown_term,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "LUNG")
"""A ``BodyPartExamined`` containing one of these is a chest (vendors write THORAX, CHEST PA,
PORTABLE CHEST...); any other value is rejected, no value at all is accepted."""
HEADER_BYTES = 64 << 20
"""Allowance for everything in a DICOM file but its pixels (overlays, private data, icons)."""

_READ = (
    *DICOM_KEYWORDS.values(),
    "BodyPartExamined", "NumberOfFrames",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "PixelData",
)
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_DEFLATED = "1.2.840.10008.1.2.1.99"


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (132 at least, 512 best) are a DICOM file or data set."""
    return head[128:132] == b"DICM" or _raw_data_set(head)


def _raw_data_set(head: bytes) -> bool:
    """Two well-formed little-endian elements of group 0002 or 0008 in ascending order."""
    pos, last = 0, (0, 0)
    for _ in range(2):
        if pos + 8 > len(head):
            return False
        group, element = struct.unpack_from("<HH", head, pos)
        if group not in (0x0002, 0x0008) or (group, element) <= last:
            return False
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return False
            pos += 12 + struct.unpack_from("<I", head, pos + 8)[0]
        elif vr in _VRS:
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
        else:
            length = struct.unpack_from("<I", head, pos + 4)[0]
            if length > 1024:
                return False
            pos += 8 + length
        last = (group, element)
    return True


def max_file_bytes(max_pixels: int) -> int:
    """The largest DICOM file (or inflated data set) read for a ``max_pixels`` limit."""
    return 2 * max_pixels + HEADER_BYTES


@dataclass(frozen=True)
class DicomImage:
    """A single-frame greyscale radiograph whose header passed every check; pixels not
    decoded yet (``trainer.imaging.decode`` checks ``size`` against the pixel limit first)."""

    dataset: Dataset
    identifiers: DicomIdentifiers

    @property
    def view(self) -> str | None:
        """The ViewPosition as written (for ``view_policy``; never stored or shown as is)."""
        return _code(self.dataset, "ViewPosition")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow gives it."""
        return int(self.dataset.Columns), int(self.dataset.Rows)

    def gray8(self) -> np.ndarray:
        """The 8-bit grey image a viewer would display (height x width uint8)."""
        ds = self.dataset
        try:
            stored = ds.pixel_array
        except MemoryError:
            raise
        except Exception as exc:
            raise BadImageError(_pixel_reason(ds, exc), self.identifiers) from None
        try:
            return display_pixels(ds, stored)
        except Exception:
            raise BadImageError("corrupt DICOM modality LUT (cannot be applied)",
                                self.identifiers) from None


def read_dicom(fp: BinaryIO, max_pixels: int) -> DicomImage:
    """Read and check the DICOM in ``fp`` without decoding pixels; its size is bounded first.

    Raises BadImageError with the reason (and the identifiers once the header was read).
    """
    import pydicom

    _setup()
    _check_size(fp, max_pixels)
    try:
        ds = pydicom.dcmread(fp, force=True, specific_tags=list(_READ))
    except MemoryError:
        raise
    except Exception:
        raise BadImageError("corrupt or truncated DICOM (the data set cannot be parsed)") from None
    identifiers = DicomIdentifiers.from_header({k: _value(ds, k) for k in DICOM_KEYWORDS.values()})
    reason = _header_reason(ds)
    if reason:
        raise BadImageError(reason, identifiers)
    return DicomImage(ds, identifiers)


def _setup() -> None:
    """pydicom as the decoder needs it (idempotent): the 12-bit JPEG Extended plugin, and no
    value validation on reading, whose warnings would quote header values into the logs
    (the values kept are checked by ``db.identifiers``; the others are never parsed)."""
    from pydicom import config

    from trainer.imaging.dicom_gdcm import register_decoders

    config.settings.reading_validation_mode = config.IGNORE
    register_decoders()


def _check_size(fp: BinaryIO, max_pixels: int) -> None:
    """Refuse a file, or a deflated data set once inflated, too big to read into memory."""
    limit = max_file_bytes(max_pixels)
    total = fp.seek(0, 2)
    fp.seek(0)
    if total > limit:
        raise BadImageError(f"DICOM file too large: {_mib(total)} exceeds the limit of "
                            f"{_mib(limit)} for {max_pixels:,} pixels")
    meta_end, syntax = _file_meta(fp)
    if syntax == _DEFLATED:
        fp.seek(meta_end)
        if _inflated_size(fp, limit) > limit:
            raise BadImageError(f"DICOM data set inflates beyond the limit of {_mib(limit)} for "
                                f"{max_pixels:,} pixels (possible decompression bomb)")
    fp.seek(0)


def _file_meta(fp: BinaryIO) -> tuple[int, str | None]:
    """(offset where the data set starts, transfer syntax UID) from the file meta group, read
    by the very function ``dcmread`` uses (a private one), so both agree on what is deflated."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(fp, True)
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except Exception:  # dcmread fails on it the same way: rejected as corrupt
        return 0, None
    return fp.tell(), (str(syntax).strip("\x00 ") if syntax else None)


def _inflated_size(fp: BinaryIO, limit: int) -> int:
    """Bytes the deflated rest of ``fp`` inflates to, counting stopped soon past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof and (chunk := fp.read(1 << 20)):
            while chunk and not inflater.eof:  # a pad byte may follow the end of the stream
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > limit:
                    return total
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise BadImageError("corrupt DICOM (the deflated data set cannot be inflated)") from None
    return total


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _value(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None when absent or unreadable (a bad value is no value)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _code(ds: Dataset, keyword: str) -> str | None:
    """A code string upper-cased for comparison; None when absent or empty."""
    value = _value(ds, keyword)
    if value is None:
        return None
    if not isinstance(value, str):
        value = value[0] if len(value) else ""
    text = str(value).strip().upper()
    return text or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _header_reason(ds: Dataset) -> str | None:
    """Why this data set is not a single-frame greyscale frontal chest radiograph, or None."""
    modality = _code(ds, "Modality")
    if modality is not None and modality not in RADIOGRAPH_MODALITIES:
        return (f"DICOM modality {shown_term(modality, MODALITIES)} is not a radiograph "
                f"(only {', '.join(RADIOGRAPH_MODALITIES)})")
    body_part = _code(ds, "BodyPartExamined")
    if body_part is not None and not any(word in body_part for word in CHEST_WORDS):
        return (f"DICOM body part {shown_term(body_part, BODY_PARTS)} is not the chest "
                "(BodyPartExamined)")
    view = _code(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return (f"lateral view (ViewPosition {view}): the models read frontal (PA or AP) "
                "chest radiographs only")
    if "PixelData" not in ds:
        if "Rows" in ds and "Columns" in ds:
            return "truncated DICOM (the image header is there, the pixel data is missing or cut)"
        return ("DICOM file without pixel data (not an image: a report, a DICOMDIR, a "
                "presentation state, or a file cut short)")
    frames = _integer(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        return f"multi-frame DICOM ({frames} frames): send single-frame images"
    photometric = _code(ds, "PhotometricInterpretation")
    samples = _integer(ds, "SamplesPerPixel")
    if samples not in (None, 1) or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = (shown_term(photometric, PHOTOMETRICS) if photometric
                 else "no photometric interpretation")
        return (f"colour DICOM ({shown}): chest radiographs are greyscale "
                "(MONOCHROME1 or MONOCHROME2)")
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    allocated, stored = _integer(ds, "BitsAllocated"), _integer(ds, "BitsStored")
    if not rows or not columns or allocated is None or stored is None:
        return "corrupt DICOM image header (Rows, Columns or bit depth missing)"
    if allocated not in (8, 16) or not 8 <= stored <= min(allocated, 16):
        return (f"unsupported DICOM bit depth ({stored} bits stored in {allocated}): "
                "8 to 16 bits stored are read")
    return _syntax_reason(ds)


def _syntax_reason(ds: Dataset) -> str | None:
    """Why the pixel data's transfer syntax cannot be decoded here, or None.

    A raw data set has no file meta: its syntax is the one pydicom found it written in, and
    only uncompressed pixel data can be read from it (compressed data names no codec).
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        if ds["PixelData"].is_undefined_length:
            return ("DICOM data set without file meta and with compressed pixel data "
                    "(the codec is unknown): export it as a DICOM file (Part 10)")
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        return None
    syntax = UID(str(syntax).strip("\x00 "))
    shown = syntax.name if syntax.is_transfer_syntax else _shown_uid(syntax)
    if not syntax.is_transfer_syntax:
        return f"unknown DICOM transfer syntax {shown}"
    if not syntax.is_compressed:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported DICOM transfer syntax {shown} (no decoder exists for it)"
    if decoder.is_available:
        return None
    return f"no decoder installed for DICOM {shown}: {_install_hint(decoder.missing_dependencies)}"


def _shown_uid(uid: str) -> str:
    return uid if len(uid) <= 64 and set(uid) <= set("0123456789.") else "(unreadable)"


def _install_hint(missing: list[str]) -> str:
    """pydicom's "label - requires a>=1 and b>=2" lines as pip commands, python-gdcm first
    (it decodes every compressed syntax but HTJ2K)."""
    options = []
    for line in missing:
        needs = line.split(" - requires ", 1)[-1]
        packages = [re.split(r"[<>=!~ ]", p.strip(), maxsplit=1)[0] for p in needs.split(" and ")]
        options.append(" ".join("python-gdcm" if p == "gdcm" else p for p in packages))
    options.sort(key=lambda o: o != "python-gdcm")
    return " or ".join(f"pip install {o}" for o in options) or "install a pydicom decoder plugin"


def _pixel_reason(ds: Dataset, exc: Exception) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", "uncompressed") if syntax else "uncompressed"
    if "less than expected" in str(exc) or isinstance(exc, EOFError):
        return "truncated DICOM (the pixel data ends early)"
    return f"corrupt or truncated DICOM pixel data ({name} cannot be decoded)"


def display_pixels(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored values -> the 8-bit grey a viewer shows: modality LUT, VOI LUT or first window
    (else the full range of the values), MONOCHROME1 inverted last."""
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    shown = _voi_lut(ds, values)
    if shown is None:
        shown = _window(ds, values)
    if shown is None:
        shown = _stretch(values, float(values.min()), float(values.max()))
    if _code(ds, "PhotometricInterpretation") == "MONOCHROME1":
        shown = 255.0 - shown
    return np.rint(shown).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def _voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first VOI LUT, its output range (every entry it holds) stretched to 0..255."""
    from pydicom.pixels import apply_voi

    items = _value(ds, "VOILUTSequence")
    if not items:
        return None
    try:
        count, first = int(items[0].LUTDescriptor[0]) or 65536, int(items[0].LUTDescriptor[1])
        entries = apply_voi(np.arange(first, first + count), ds, index=0).astype(np.float64)
        out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
    except Exception:
        return None
    return _stretch(out, float(entries.min()), float(entries.max()))


def _window(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first window centre and width (PS3.3 C.11.2.1.2) onto 0..255; None if absent or
    unusable."""
    centre, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    if centre is None or width is None:
        return None
    function = _code(ds, "VOILUTFunction") or "LINEAR"
    if function == "SIGMOID" and width > 0:
        return 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0) * 255.0
    if function == "LINEAR" and width >= 1:
        if width == 1:
            return np.where(values > centre - 0.5, 255.0, 0.0)
        return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    return None


def _first_number(ds: Dataset, keyword: str) -> float | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, int | float | str):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
