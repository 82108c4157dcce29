"""Errors every floor raises; the CLI shows them to the user as one line (no traceback)."""

from __future__ import annotations

from db.identifiers import DicomIdentifiers


class CxrError(Exception):
    """Base for errors with a message meant for the user."""


class SchemaBehindError(CxrError):
    """The database schema is older than this code."""


class ModelNotFoundError(CxrError):
    """No such model version, or no production version for a stage."""


class BadImageError(CxrError):
    """The file cannot be decoded as a supported X-ray image (the message is the reason).

    ``identifiers`` is set for a DICOM rejected after its header was read (a lateral view, a
    CT slice), so even a rejected result can be found in the PACS.
    """

    def __init__(self, reason: str, identifiers: DicomIdentifiers | None = None):
        super().__init__(reason)
        self.identifiers = identifiers


class WeightsUnavailableError(CxrError):
    """Pretrained weights could not be downloaded or found locally."""


class DatasetError(CxrError):
    """The training data folder has the wrong layout or an empty class."""


class ImportModelError(CxrError):
    """A model file cannot be imported as declared (the message says why)."""


class BrokerUnavailableError(CxrError):
    """Nothing answers at the broker URL and no private Redis can be started."""


class FlowerConfigError(CxrError):
    """Flower settings that would be unsafe or that Flower would misread."""


class ExplainError(CxrError):
    """A heatmap cannot be computed for this model or result (the message says why)."""


class NoFeatureMapError(ExplainError):
    """The model has no convolutional feature map for Grad-CAM to weight."""


class LabelError(CxrError):
    """A ground-truth label that cannot be stored: unknown label or source, no such image."""
