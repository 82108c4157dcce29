"""The DICOM vocabulary a reason may quote, and what an unknown ViewPosition means.

Sites put free text in coded elements (a name, a comment), so a reason echoes a header value
only when it is a defined term: a charset filter would still let ``DOE JANE`` through.
"""

from __future__ import annotations

LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
"""ViewPositions read as frontal; one that is neither these nor lateral is unknown and follows
``CXR_UNKNOWN_VIEW`` (``view_policy``). An empty or absent one is not stated, like a JPEG's."""
MODALITIES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX", "ECG",
    "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN",
    "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV",
    "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG",
    "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XC", "AS", "CD",
    "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST",
    "VF",
})
"""Modality defined terms (PS3.3 C.7.3.1.1.1, retired ones too): the only modalities a reason
names."""
BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ANKLE", "ARM", "BRAIN", "BREAST", "CALCANEUS", "CHESTABDOMEN",
    "CLAVICLE", "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FACE", "FEMUR", "FINGER", "FOOT",
    "FOREARM", "HAND", "HEAD", "HEADNECK", "HEART", "HIP", "HUMERUS", "JAW", "KNEE", "LEG",
    "LSPINE", "MANDIBLE", "NECK", "ORBIT", "PELVIS", "SACRUM", "SCAPULA", "SHOULDER", "SINUS",
    "SKULL", "SPINE", "SSPINE", "TIBIA", "TLSPINE", "TOE", "TSPINE", "WHOLEBODY", "WRIST",
})
"""Common BodyPartExamined defined terms (PS3.16 Annex L) a refusal may name."""
PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB",
                          "CMYK", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
                          "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})
KNOWN_VIEWS = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LAO", "RAO",
                         "LPO", "RPO", "AP AXIAL", "PA AXIAL", "OBLIQUE", "LAT", "LATERAL"})
"""ViewPosition values a reason may name (PS3.3 C.8.11.5 defined terms and common ones)."""
NOT_SHOWN = "(a value outside the DICOM vocabulary, not shown)"


def shown_term(code: str, vocabulary: frozenset[str]) -> str:
    """A header code as a reason may show it: a defined term, never free text."""
    return code if code in vocabulary else NOT_SHOWN


def view_policy(view: str | None, unknown_view: str) -> tuple[str | None, str | None]:
    """(why refused, note for an accepted image) for a ViewPosition under ``CXR_UNKNOWN_VIEW``
    (``accept`` or ``reject``); lateral views are refused by the header checks already."""
    view = (view or "").strip().upper()
    if not view or view in FRONTAL_VIEWS or view in LATERAL_VIEWS:
        return None, None
    shown = view if view in KNOWN_VIEWS else NOT_SHOWN
    if unknown_view == "reject":
        return (f"unknown view (ViewPosition {shown}): the models read frontal (PA or AP) chest "
                "radiographs only (CXR_UNKNOWN_VIEW=reject)"), None
    return None, (f"unknown view (ViewPosition {shown}) read as frontal "
                  "(CXR_UNKNOWN_VIEW=accept)")
