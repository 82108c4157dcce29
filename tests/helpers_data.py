"""Test-only readers of what the product writes (kept out of the product: nothing there uses
them)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.synth.xrays import LESIONS


def load_lesions(root: Path) -> dict[str, list[dict]]:
    """Relative path -> the opacities drawn in that image (``kind`` and ``box``)."""
    return json.loads((Path(root) / LESIONS).read_text())["images"]
