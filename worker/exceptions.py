"""Errors the CLI shows to the user as one readable line (no traceback)."""


class CxrError(Exception):
    """Base for errors with a message meant for the user."""


class SchemaBehindError(CxrError):
    """The database schema is older than this code."""


class ModelNotFoundError(CxrError):
    """No such model version, or no production version for a stage."""


class BadImageError(CxrError):
    """The file cannot be decoded as a supported X-ray image (the message is the reason)."""


class WeightsUnavailableError(CxrError):
    """Pretrained weights could not be downloaded or found locally."""


class DatasetError(CxrError):
    """The training data folder has the wrong layout or an empty class."""
