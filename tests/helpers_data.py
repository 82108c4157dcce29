"""Test-only readers of what the product writes (kept out of the product: nothing there uses
them)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from trainer.synth.xrays import LESIONS
from worker.inbox.intake import Enqueue, IntakeResult, intake_files
from worker.settings import Settings


def load_lesions(root: Path) -> dict[str, list[dict]]:
    """Relative path -> the opacities drawn in that image (``kind`` and ``box``)."""
    return json.loads((Path(root) / LESIONS).read_text())["images"]


def intake_file(path: Path, settings: Settings, enqueue: Enqueue | None = None
                ) -> IntakeResult | None:
    """Take one complete inbox file through the real (batch) intake; None when there was
    nothing to take (gone, not a file)."""
    results = intake_files([path], settings, enqueue)
    return results[0] if results else None


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount`` (we are root) for the block; skips the test
    where mounting is not allowed."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
