"""Synthetic drawings written as DICOM, the many ways modalities and PACS write radiographs.

``cxr synth --format dicom`` writes each image with the next of ``VARIANTS``, so any ten
consecutive images cover both photometric interpretations, 8 to 16 bits stored, a rescale
(modality LUT), LINEAR and LINEAR_EXACT windows and every transfer syntax the decoder reads.
The stored values and window are chosen so that the viewer pipeline (``trainer.imaging.dicom``)
shows the 8-bit drawing again (to a grey level, or to a lossy codec's error), so a model sees
the same image as from the JPEG data set. Identifiers are made-up UIDs; the patient name and
id say SYNTHETIC. Nothing here is medical data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from trainer.imaging.dicom_gdcm import encode_frame

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root: made-up UIDs that never collide with a real study."""
_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit}


@dataclass(frozen=True)
class Variant:
    """How one synthetic image is stored (what a given modality or PACS would write)."""

    photometric: str
    bits_stored: int
    transfer_syntax: str
    window_function: str = "LINEAR"
    rescale: tuple[float, float] | None = None
    """(slope, intercept) of a modality LUT; None writes no rescale."""


VARIANTS = (
    Variant("MONOCHROME2", 8, ExplicitVRLittleEndian),
    Variant("MONOCHROME1", 12, RLELossless),
    Variant("MONOCHROME2", 16, JPEGLSLossless, rescale=(2.0, -1024.0)),
    Variant("MONOCHROME2", 8, JPEGBaseline8Bit),
    Variant("MONOCHROME1", 16, JPEG2000Lossless, window_function="LINEAR_EXACT"),
    Variant("MONOCHROME2", 12, JPEGLosslessSV1),
    Variant("MONOCHROME2", 12, JPEGExtended12Bit),
    Variant("MONOCHROME2", 10, ImplicitVRLittleEndian, rescale=(1.0, -512.0)),
    Variant("MONOCHROME1", 8, DeflatedExplicitVRLittleEndian),
    Variant("MONOCHROME2", 16, ExplicitVRBigEndian),
)


def stored_values(gray: np.ndarray, variant: Variant) -> np.ndarray:
    """The stored pixel values that display as ``gray`` (uint8) under ``variant``'s window."""
    top = (1 << variant.bits_stored) - 1
    shown = gray.astype(np.float64)
    if variant.photometric == "MONOCHROME1":
        shown = 255.0 - shown
    dtype = np.uint8 if variant.bits_stored == 8 else np.uint16
    return np.rint(shown * (top / 255.0)).astype(dtype)


def synthetic_dataset(
    gray: np.ndarray, variant: Variant, *, patient: str, accession: str, seed: int, index: int,
    modality: str = "DX", view: str = "PA",
) -> Dataset:
    """A single-frame chest radiograph data set holding ``gray`` (uint8 height x width)."""
    uid = _uids(seed, index)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = uid("sop")
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientName = f"SYNTHETIC^{patient}"
    ds.PatientID = patient
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = variant.photometric
    ds.BitsAllocated = 8 if variant.bits_stored == 8 else 16
    ds.BitsStored = variant.bits_stored
    ds.HighBit = variant.bits_stored - 1
    ds.PixelRepresentation = 0
    slope, intercept = variant.rescale or (1.0, 0.0)
    if variant.rescale:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    top = (1 << variant.bits_stored) - 1
    if variant.window_function == "LINEAR":  # PS3.3 C.11.2.1.2.1: c and w of the full range
        centre, width = slope * (top + 1) / 2 + intercept, slope * (top + 1)
    else:
        centre, width = slope * top / 2 + intercept, slope * top
        ds.VOILUTFunction = variant.window_function
    ds.WindowCenter, ds.WindowWidth = round(centre, 4), round(width, 4)
    store_pixels(ds, stored_values(gray, variant), variant.transfer_syntax)
    return ds


def write_dicom(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _uids(seed: int, index: int):
    return lambda kind: generate_uid(UID_PREFIX, entropy_srcs=["cxr-synth", str(seed),
                                                               str(index), kind])


def store_pixels(ds: Dataset, stored: np.ndarray, transfer_syntax: str) -> None:
    """Put ``stored`` (uint8 or uint16, as ``ds``'s pixel description says) into ``ds`` as
    ``transfer_syntax`` writes it: byte order, RLE, or a GDCM-encoded JPEG family frame."""
    syntax = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    elif syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif not syntax.is_compressed:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    else:
        if syntax == JPEGBaseline8Bit:  # Pillow: GDCM fails on an odd number of 8-bit pixels
            buf = io.BytesIO()
            Image.fromarray(stored.astype(np.uint8)).save(buf, "JPEG", quality=90)
            frame = buf.getvalue()
        else:
            frame = encode_frame(stored, int(ds.BitsStored), syntax, ds.PhotometricInterpretation)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        if syntax in _LOSSY:
            ds.LossyImageCompression = "01"
