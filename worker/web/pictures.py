"""The two pictures of an image page, found from the database row alone (never a request's path):
the archived file decoded as the model saw it, and the worker's heatmap.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from PIL import Image as PILImage

from db.exceptions import BadImageError
from trainer.imaging.decode import Feed, decode_bytes
from worker.classify.reading import read_archived
from worker.settings import Settings

DEFAULT_FEED = Feed(224)
MAX_HEATMAP_BYTES = 16 * 1024 * 1024


def model_feed(settings: Settings, bundle_path: str | None) -> Feed:
    """The input size and resize of the bundle at ``bundle_path`` (the default when unreadable)."""
    from trainer.model.bundle import MANIFEST_FILE, Manifest

    if not bundle_path:
        return DEFAULT_FEED
    try:
        return Manifest.read(settings.models_path / bundle_path / MANIFEST_FILE).feed
    except (OSError, ValueError, TypeError, KeyError):
        return DEFAULT_FEED


def model_input_png(settings: Settings, stored_path: str | None, sha256: str, feed: Feed
                    ) -> tuple[bytes | None, str | None]:
    """(PNG of the pixels the model got, None) or (None, why not)."""
    data, problem = read_archived(settings, stored_path, sha256)
    if data is None:
        return None, problem
    try:
        pixels = decode_bytes(data, feed.size, settings.max_image_pixels, resize=feed.resize)
    except BadImageError as exc:
        return None, str(exc)
    out = io.BytesIO()
    PILImage.fromarray(pixels[..., 0]).save(out, format="PNG")
    return out.getvalue(), None


def heatmap_png(settings: Settings, heatmap_path: str | None) -> bytes | None:
    """The stored heatmap's bytes, when the row names a regular file inside heatmaps/."""
    if not heatmap_path:
        return None
    root = settings.heatmaps_dir.resolve()
    path = (Path(settings.data_dir).absolute() / heatmap_path).resolve()
    if root not in path.parents:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_HEATMAP_BYTES:
            return None
        data = fh.read(MAX_HEATMAP_BYTES)
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None
