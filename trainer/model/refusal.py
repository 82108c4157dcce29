"""What the input gate says when it refuses an image (shared by its pixel and learned parts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why an image gets no label: ``check`` names the test, ``reason`` says what to do."""

    check: str
    reason: str
    score: float | None = None
    threshold: float | None = None
