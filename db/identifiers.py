"""The DICOM identifiers a result keeps: the allowlist of header values the service stores.

With the study, series and SOP instance UIDs and the accession number a result can be joined
to the RIS/PACS worklist; modality and view position say what was classified. Nothing else
from a DICOM header (patient name, id, birth date, ...) is ever read into a value the service
keeps, so this class is the whole of what crosses from a file into the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

MAX_LENGTH = 64
"""Longest stored value (the DICOM limit for a UID; other kept values are shorter)."""

_UID_CHARS = frozenset("0123456789.")


@dataclass(frozen=True)
class DicomIdentifiers:
    """One DICOM image's identifiers; field names are the ``images`` and ``results`` columns."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    view_position: str | None = None

    @classmethod
    def from_header(cls, values: Mapping[str, object]) -> DicomIdentifiers:
        """Build from ``{DICOM keyword: value}``; unusable values (not printable ASCII, too
        long, a UID that is not digits and dots) become None rather than garbage in a join key.
        """
        kept = {}
        for name, keyword in DICOM_KEYWORDS.items():
            kept[name] = _clean(values.get(keyword), uid=name.endswith("_uid"))
        return cls(**kept)

    def columns(self) -> dict[str, str | None]:
        return asdict(self)


DICOM_KEYWORDS: dict[str, str] = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "accession_number": "AccessionNumber",
    "modality": "Modality",
    "view_position": "ViewPosition",
}
"""Column -> DICOM keyword, in the order of the dataclass fields."""


def _clean(value: object, *, uid: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None  # a multi-valued element: the first value
        if value is None:
            return None
    text = str(value).strip().rstrip("\x00").strip()
    if not text or len(text) > MAX_LENGTH:
        return None
    if not all(" " <= c <= "~" for c in text):
        return None
    if uid and not set(text) <= _UID_CHARS:
        return None
    return text
