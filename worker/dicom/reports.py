"""A result as DICOM: a Comprehensive SR in the source study, and the heatmap as a Secondary
Capture in a series of its own. Built with highdicom from the source's header (patient and
study come from it, so the PACS files both under the right study); pure, so tests read the
objects back without a network.

The SR's tree (docs/deployment.md says why a Comprehensive SR and not TID 1500):

    CONTAINER  Diagnostic imaging report (LOINC 18748-4)
      CODE     Finding (DCM 121071): Normal / Bacterial / Viral pneumonia / Pneumonia
               or TEXT Finding: "refused: <reason>" when the image was refused
      NUM      Probability of pneumonia (99CXR)  {ratio}       stage 1
      NUM      Probability of viral pneumonia (99CXR) {ratio}  stage 2, when it ran
      TEXT     Algorithm Name (DCM 111001) / Algorithm Version (DCM 111003) per stage
      IMAGE    Source of Measurement (DCM 121112): the classified instance
      TEXT     Comment (DCM 121106): the disclaimer
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from db.vocabulary import DISCLAIMER

MANUFACTURER = "cxr-triage"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS

REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
FINDING = Code("121071", "DCM", "Finding")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SOURCE = Code("121112", "DCM", "Source of Measurement")
COMMENT = Code("121106", "DCM", "Comment")
REVIEW = Code("REVIEW", "99CXR", "Review flag")
P_PNEUMONIA = Code("P-PNEUMONIA", "99CXR", "Probability of pneumonia")
P_VIRUS = Code("P-VIRUS", "99CXR", "Probability of viral pneumonia given pneumonia")
RATIO = Code("{ratio}", "UCUM", "ratio")
LABEL_CODES = {
    "NORMAL": Code("17621005", "SCT", "Normal"),
    "BACTERIA": Code("53084003", "SCT", "Bacterial pneumonia"),
    "VIRUS": Code("75570004", "SCT", "Viral pneumonia"),
    "PNEUMONIA": Code("233604007", "SCT", "Pneumonia"),
}


TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                       "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Patient and study attributes a DICOM object must carry, empty when unknown (type 2)."""


def evidence_header(source: Dataset) -> Dataset:
    """A copy of ``source``'s header without pixels, with the type 2 patient and study
    attributes present (empty when the modality left them out), as highdicom needs them."""
    header = Dataset()
    header.file_meta = getattr(source, "file_meta", Dataset())
    for element in source:
        if element.tag < 0x7FE00000:
            header.add(element)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def series_uid(study_uid: str, kind: str) -> str:
    """One series per study and kind for all our objects, the same on every try."""
    return generate_uid(entropy_srcs=["cxr-triage", study_uid, kind])


def _items(result: dict[str, Any], source: Dataset) -> list:
    items: list = []
    if result.get("label"):
        items.append(hd.sr.CodeContentItem(FINDING, LABEL_CODES[result["label"]], CONTAINS))
    else:
        why = result.get("error") or result.get("status") or "no result"
        items.append(hd.sr.TextContentItem(FINDING, f"refused: {why}"[:1000], CONTAINS))
    if result.get("review"):  # the abstain issue's flag (uncertain, out_of_scope)
        items.append(hd.sr.TextContentItem(REVIEW, f"review: {result['review']}", CONTAINS))
    for key, code in (("p_pneumonia", P_PNEUMONIA), ("p_virus", P_VIRUS)):
        if result.get(key) is not None:
            items.append(hd.sr.NumContentItem(code, round(float(result[key]), 6), RATIO,
                                              relationship_type=CONTAINS))
    for stage in ("pneumonia", "infection"):
        version = result.get(f"{stage}_model")
        if version is not None:
            items.append(hd.sr.TextContentItem(ALGORITHM_NAME, f"cxr-triage {stage}", CONTAINS))
            items.append(hd.sr.TextContentItem(ALGORITHM_VERSION, f"{stage}/v{version}",
                                               CONTAINS))
    items.append(hd.sr.ImageContentItem(SOURCE, source.SOPClassUID, source.SOPInstanceUID,
                                        relationship_type=CONTAINS))
    items.append(hd.sr.TextContentItem(COMMENT, DISCLAIMER, CONTAINS))
    return items


def result_sr(source: Dataset, result: dict[str, Any], sop_instance_uid: str) -> Dataset:
    """The result of one image as a Comprehensive SR in ``source``'s study."""
    source = evidence_header(source)
    root = hd.sr.ContainerContentItem(REPORT)
    root.ContentSequence = hd.sr.ContentSequence(_items(result, source))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root,
        series_instance_uid=series_uid(source.StudyInstanceUID, "sr"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="cxr-triage result (decision support only)",
    )
    return sr


def heatmap_sc(source: Dataset, rgb: np.ndarray, sop_instance_uid: str) -> Dataset:
    """The heatmap picture (uint8 RGB) as a Secondary Capture in ``source``'s study."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence_header(source), pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=series_uid(source.StudyInstanceUID, "sc"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"),
    )
    sc.SeriesDescription = "cxr-triage heatmap (decision support only)"
    sc.ImageComments = DISCLAIMER
    return sc
