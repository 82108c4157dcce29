"""What decoding costs in memory, and a budget that makes large images wait for each other
instead of all decoding at once (``CXR_DECODE_MEMORY_MB``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from trainer.imaging.decode import PNG_MAGIC, SERVICE_RESIZE, declared_size
from trainer.imaging.jpeg_draft import draft_scale


def decode_cost(head: bytes, size: int, resize: str = SERVICE_RESIZE) -> int:
    """Bytes of memory decoding a file costs at its peak, from its header (0 if unknown).

    16-bit PNGs are held as 32-bit samples by Pillow, copied once for the stretch; JPEGs are
    decoded at a reduced DCT scale close to ``2 * size`` (full size for a declared filter).
    """
    dims = declared_size(head)
    if dims is None:
        return 0
    width, height = dims
    if head.startswith(PNG_MAGIC):
        bit_depth = head[24] if len(head) > 24 else 8
        return width * height * (9 if bit_depth == 16 else 5)
    if resize != SERVICE_RESIZE:  # full decode, colour (4 bytes) then grey (1)
        return width * height * 5
    scale = draft_scale(width, height, 2 * size)
    return (width // scale) * (height // scale) * 4


class MemoryBudget:
    """At most ``limit`` bytes of decoding at once across threads; a single decode larger than
    the whole budget runs alone instead of failing."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = min(max(0, int(cost)), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + cost <= self.limit)
            self.in_use += cost
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= cost
                self._cond.notify_all()
