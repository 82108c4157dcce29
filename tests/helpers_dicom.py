"""DICOM files for tests, built with pydicom: a CR chest PA data set carrying a known patient
name, id and birth date (which must never reach the database, logs or broker), any pixels,
any transfer syntax (compressed frames through ``trainer.synth.dicom_writer.store_pixels``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from trainer.synth.dicom_writer import store_pixels

PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Zzyzx^Quintessa", "PHI-8675309", "19010203"
UIDS = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
        "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1.2",
        "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.1.2.3"}


def blocks(values, dtype=np.uint16) -> np.ndarray:
    """64x64 with eight 8-column blocks, one value each (``values`` has 8 entries)."""
    return np.repeat(np.asarray(values, dtype=dtype)[np.newaxis, :], 8, axis=1).repeat(64, axis=0)


def make_ds(stored: np.ndarray, syntax: str = ExplicitVRLittleEndian, *,
            bits_stored: int | None = None, **attrs) -> Dataset:
    """A CR chest PA data set holding ``stored``; ``attrs`` set elements (None removes one)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = UIDS["SOPInstanceUID"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    for keyword, uid in UIDS.items():
        setattr(ds, keyword, uid)
    ds.AccessionNumber = "ACC-0042"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    store_pixels(ds, stored, syntax)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def texture(bits: int) -> np.ndarray:
    """A smooth 64x64 image with some noise: realistic for the lossy codecs."""
    y, x = np.mgrid[0:64, 0:64]
    rng = np.random.default_rng(bits)
    field = 0.5 + 0.3 * np.sin(x / 9) * np.cos(y / 13) + rng.normal(0, 0.004, (64, 64))
    top = (1 << bits) - 1
    return np.rint(np.clip(field, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
