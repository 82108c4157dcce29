"""A heatmap as a picture a person reads: the image as the model saw it, the same image with the
heatmap over it, and what the model said in the margin.

Pillow only (no matplotlib), so a worker can draw one per result at little cost. The image is
enlarged by whole pixels (nearest neighbour) so the picture shows exactly the pixels the model
classified; the heatmap is blended in proportion to its own strength above a floor, so where
the model found little the X-ray stays plain. The hottest point is ringed.
"""

from __future__ import annotations

import functools
import io
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISPLAY_PX = 256
MARGIN_PX = 300
ALPHA = 0.6
FLOOR = 0.35
"""Heat below this fraction of the peak is not drawn: weak evidence leaves the X-ray plain."""
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
MUTED = (165, 165, 170)
_TURBO = (  # polynomial fit of Google's Turbo colour map (Mikhailov, 2019), x in [0, 1]
    (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
    (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
    (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
)


def turbo(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (blue = low, red = high)."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    powers = np.concatenate([x ** k for k in range(6)], axis=-1)
    rgb = powers @ np.asarray(_TURBO).T
    return (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


@functools.cache
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType
        return ImageFont.load_default()


def blend(pixels: np.ndarray, cam: np.ndarray, display: int = DISPLAY_PX
          ) -> tuple[Image.Image, Image.Image]:
    """(the image enlarged, the image with the heatmap over it), by the whole factor that
    brings them nearest ``display`` px."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    size = pixels.shape[0]
    scale = max(1, round(display / size))
    side = size * scale
    plain = Image.fromarray(pixels).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    heat = Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(
        (side, side), Image.Resampling.BILINEAR)
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    alpha = (ALPHA * np.clip((h - FLOOR) / (1.0 - FLOOR), 0.0, 1.0))[..., None]
    base = np.asarray(plain, dtype=np.float32)
    mixed = base * (1 - alpha) + turbo(h).astype(np.float32) * alpha
    return plain, Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def heatmap_panel(picture: Image.Image) -> Image.Image:
    """The middle panel (the image with the heatmap over it) of a ``render_overlay`` picture."""
    side = (picture.width - MARGIN_PX) // 2
    return picture.crop((side, 0, 2 * side, side))


def render_overlay(pixels: np.ndarray, cam: np.ndarray, title: str, lines: Sequence[str],
                   display: int = DISPLAY_PX) -> bytes:
    """PNG bytes: ``pixels`` (S, S, 3) uint8 as the model saw them, beside the same image with
    ``cam`` (S, S) in [0, 1] over it, and a margin with ``title``, ``lines`` and a colour key."""
    plain, mixed = blend(pixels, cam, display)
    side = plain.width
    if np.max(cam) > 0:
        row, col = np.unravel_index(int(np.argmax(cam)), np.shape(cam))
        cx, cy = (col + 0.5) * side / np.shape(cam)[1], (row + 0.5) * side / np.shape(cam)[0]
        ring = max(5, side // 40)
        ImageDraw.Draw(mixed).ellipse([cx - ring, cy - ring, cx + ring, cy + ring],
                                      outline=(255, 255, 255), width=2)
    big, small = _font(20), _font(14)
    wrapped = [part for line in lines for part in textwrap.wrap(line, 34) or [""]]
    height = max(side, 48 + 20 * len(wrapped) + 70)
    canvas = Image.new("RGB", (2 * side + MARGIN_PX, height), BACKGROUND)
    canvas.paste(plain, (0, 0))
    canvas.paste(mixed, (side, 0))
    draw = ImageDraw.Draw(canvas)
    x = 2 * side + 14
    draw.text((x, 12), title, fill=TEXT, font=big)
    y = 48
    for line in wrapped:
        draw.text((x, y), line, fill=MUTED, font=small)
        y += 20
    key_top = height - 44
    key = turbo(np.linspace(0.0, 1.0, MARGIN_PX - 28))[None].repeat(12, axis=0)
    canvas.paste(Image.fromarray(key), (x, key_top))
    draw.text((x, key_top + 16), "less", fill=MUTED, font=small)
    more = "more evidence"
    draw.text((x + MARGIN_PX - 28 - draw.textlength(more, font=small), key_top + 16), more,
              fill=MUTED, font=small)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
