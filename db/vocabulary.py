"""The words every floor shares: stages, their classes, labels, statuses, the disclaimer.

Statuses and labels are ``StrEnum`` values, so they store as plain strings in SQL and compare
equal to them; the class names of each stage fix the output order every model bundle uses.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    PNEUMONIA = "pneumonia"
    INFECTION = "infection"


class Label(StrEnum):
    NORMAL = "NORMAL"
    BACTERIA = "BACTERIA"
    VIRUS = "VIRUS"
    PNEUMONIA = "PNEUMONIA"
    """Stage 1 said pneumonia and no infection model is in production."""


class ImageStatus(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    WAITING_MODEL = "waiting_model"
    REJECTED = "rejected"
    FAILED = "failed"


class Review(StrEnum):
    """The ``review`` column: what a person must look at. Empty (NULL) for a confident answer;
    ``uncertain`` is stored with the stage whose probability lay in its band
    (``uncertain:pneumonia``), see ``review_uncertain``."""

    UNCERTAIN = "uncertain"
    OUT_OF_SCOPE = "out_of_scope"
    """Refused by the input gate: not something the models can read, so no label."""


def review_uncertain(stage: str) -> str:
    """The review flag of a label kept but inside ``stage``'s uncertain band."""
    return f"{Review.UNCERTAIN}:{stage}"


class ModelStatus(StrEnum):
    CANDIDATE = "candidate"
    PRODUCTION = "production"
    ARCHIVED = "archived"


LABEL_SOURCES = ("review", "report", "import")
"""Where a ground-truth label came from: a radiologist's review, the report, a file import."""

STAGE_CLASSES: dict[str, tuple[str, str]] = {
    Stage.PNEUMONIA: ("NORMAL", "PNEUMONIA"),
    Stage.INFECTION: ("BACTERIA", "VIRUS"),
}
"""Each stage's classes in model output order: the second one is the positive class."""

POSITIVE_CLASS: dict[str, str] = {stage: names[1] for stage, names in STAGE_CLASSES.items()}

CASCADE_CLASSES: tuple[str, str, str] = ("NORMAL", "BACTERIA", "VIRUS")
"""The three answers of the whole cascade, in the order evaluations index them."""

FINAL_STATUSES = (ImageStatus.DONE, ImageStatus.REJECTED, ImageStatus.FAILED)
OPEN_STATUSES = (
    ImageStatus.RECEIVED,
    ImageStatus.QUEUED,
    ImageStatus.PROCESSING,
    ImageStatus.WAITING_MODEL,
)

DISCLAIMER = "Decision support only, not a medical device: a clinician reads every image."
