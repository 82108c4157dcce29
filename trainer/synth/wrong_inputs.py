"""Synthetic wrong inputs: images a chest-X-ray triage service must refuse, with no patient data.

The input gate (``trainer.model.gate``) is tested and demonstrated on these: lateral chest
views, inverted (negative) frontal films, other body parts (a long bone, a hand), colour
photographs, scanned text pages and CT-like axial slices. Each is drawn with numpy and Pillow,
varied by a seed, and stylised like ``trainer.synth.xrays`` (whose primitives it reuses), so a
gate that refuses them has learnt "not a frontal chest film", not "not drawn by this file".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.synth.xrays import JPEG_QUALITY, LABELS, _ellipse, _smooth_noise, render_xray

KINDS = ("lateral", "inverted", "long_bone", "hand", "colour_photo", "text_page", "ct_slice")
"""Every kind of wrong input, in a fixed order (file names and tests use these names)."""

DICOM_KINDS = ("lateral", "inverted", "long_bone", "hand", "ct_slice")
"""Kinds that also exist as DICOM in practice (a photo or a page arrives as JPEG/PNG)."""


def _grid(width: int, height: int, rng: np.random.Generator, jitter: float = 0.06):
    """Centred coordinates u (left-right), v (top-bottom) in about [-1, 1], slightly shifted,
    scaled and rotated as a real acquisition would be."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    x = (xs / (width - 1)) * 2 - 1
    y = (ys / (height - 1)) * 2 - 1
    scale = rng.uniform(0.9, 1.1)
    du, dv = rng.uniform(-jitter, jitter, size=2)
    angle = math.radians(rng.uniform(-8, 8))
    x, y = x / scale - du, y / scale - dv
    return (math.cos(angle) * x - math.sin(angle) * y,
            math.sin(angle) * x + math.cos(angle) * y)


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure, contrast and noise like ``render_xray``; uint8 grey."""
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _lateral(rng, width, height):
    """A lateral chest view: the torso seen side-on, one large lung field, the spine along the
    back (right), the sternum at the front (left), the heart low in front."""
    u, v = _grid(width, height, rng)
    facing = rng.choice([-1.0, 1.0])  # patients face either way
    u = u * facing
    body = _ellipse(u, v, 0.0, 0.1, 0.78, 1.25, softness=0.25)
    lung = _ellipse(u, v, 0.05, -0.05, 0.5, 0.7, softness=0.4)
    heart = _ellipse(u, v, -0.25, 0.3, 0.3, 0.3, softness=0.7)
    spine = np.exp(-(((u - 0.55) / 0.09) ** 2)) * (0.75 + 0.25 * np.cos(v * 30))
    sternum = np.exp(-(((u + 0.62) / 0.04) ** 2)) * (np.abs(v) < 0.6)
    arms = _ellipse(u, v, 0.1, -0.55, 0.35, 0.25, softness=0.6)
    img = 0.06 + 0.5 * body + 0.2 * spine + 0.1 * sternum + 0.15 * heart + 0.1 * arms
    img -= 0.3 * lung * (1 - 0.6 * heart)
    img += 0.04 * _smooth_noise(rng, height, width, cells=8) * body
    return _finish(rng, img)


def _inverted(rng, width, height):
    """A frontal chest film shown as a negative (a MONOCHROME1 image exported raw)."""
    return 255 - render_xray(rng, LABELS[int(rng.integers(0, 3))], width, height)


def _bone(u, v, cu, cv, length, thick, angle):
    """A long bone along ``angle``: a bright cortex, a paler marrow, knobbly ends."""
    c, s = math.cos(angle), math.sin(angle)
    a = (u - cu) * c + (v - cv) * s
    b = -(u - cu) * s + (v - cv) * c
    ends = np.exp(-(((np.abs(a) - length) / (0.25 * length)) ** 2))
    width = thick * (1 + 0.8 * ends)
    shaft = np.clip(1 - np.abs(b) / width, 0, 1) * (np.abs(a) < length * 1.1)
    cortex = shaft * (np.abs(b) > 0.45 * width)
    return 0.55 * shaft + 0.35 * cortex


def _long_bone(rng, width, height):
    """A femur or tibia film: soft tissue around one or two long bones on a dark field."""
    u, v = _grid(width, height, rng)
    angle = math.pi / 2 + math.radians(rng.uniform(-20, 20))
    c, s = math.cos(angle), math.sin(angle)
    across = -u * s + v * c
    limb = np.clip(1 - np.abs(across) / rng.uniform(0.35, 0.55), 0, 1) ** 0.5
    img = 0.04 + 0.35 * limb
    pair = rng.random() < 0.5
    offsets = (-0.1, 0.12) if pair else (0.0,)
    for k, off in enumerate(offsets):
        thick = rng.uniform(0.07, 0.12) * (0.6 if k else 1.0)
        img += _bone(u, v, -off * s, off * c, rng.uniform(0.75, 1.0), thick, angle)
    img += 0.03 * _smooth_noise(rng, height, width, cells=6) * limb
    return _finish(rng, img)


def _hand(rng, width, height):
    """A PA hand: palm, five rays of phalanges with joint gaps, on a dark field."""
    u, v = _grid(width, height, rng, jitter=0.1)
    img = 0.04 + 0.3 * _ellipse(u, v, 0.0, 0.45, 0.45, 0.45, softness=0.3)
    img += 0.3 * _ellipse(u, v, 0.0, 0.95, 0.25, 0.3, softness=0.3)  # wrist
    for k, spread in enumerate(np.linspace(-0.55, 0.55, 5)):
        angle = -math.pi / 2 + spread * rng.uniform(0.5, 0.8)
        length = 0.7 if k in (1, 2, 3) else 0.5
        root_u, root_v = spread * 0.55, 0.35
        c, s = math.cos(angle), math.sin(angle)
        a = (u - root_u) * c + (v - root_v) * s
        b = -(u - root_u) * s + (v - root_v) * c
        finger = np.clip(1 - np.abs(b) / 0.09, 0, 1) * (a > -0.3) * (a < length)
        joints = np.abs(np.sin(a / length * 3 * math.pi)) > 0.15
        bone = np.clip(1 - np.abs(b) / 0.045, 0, 1) * (a > -0.35) * (a < length - 0.04) * joints
        img += 0.3 * finger + 0.45 * bone
    return _finish(rng, img)


def _ct_slice(rng, width, height):
    """An axial CT slice: black air, a round body section with a fat rim, grey organs, a bright
    vertebra and a table line below."""
    u, v = _grid(width, height, rng, jitter=0.04)
    au, av = rng.uniform(0.7, 0.85), rng.uniform(0.5, 0.65)
    body = _ellipse(u, v, 0.0, 0.0, au, av, softness=0.04)
    inner = _ellipse(u, v, 0.0, 0.0, au - 0.08, av - 0.08, softness=0.05)
    img = 0.02 + 0.3 * body + 0.12 * inner
    for _ in range(int(rng.integers(3, 6))):  # organs
        cu, cv = rng.uniform(-0.45, 0.45), rng.uniform(-0.3, 0.25)
        img += rng.uniform(-0.08, 0.12) * _ellipse(u, v, cu, cv, rng.uniform(0.12, 0.3),
                                                    rng.uniform(0.1, 0.2), softness=0.3) * inner
    vert = _ellipse(u, v, 0.0, av - 0.22, 0.12, 0.1, softness=0.2)
    img += 0.45 * vert
    if rng.random() < 0.5:  # a chest slice: two dark lungs
        for side in (-1, 1):
            img -= 0.35 * _ellipse(u, v, side * 0.35, -0.05, 0.25, 0.35, softness=0.3) * inner
    img += 0.3 * np.exp(-(((v - av - 0.12) / 0.015) ** 2)) * (np.abs(u) < 0.9)
    img += 0.02 * _smooth_noise(rng, height, width, cells=14) * body
    return _finish(rng, img)


def _colour_photo(rng, width, height):
    """A colour snapshot: sky and ground gradients, a few saturated objects (RGB uint8)."""
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    sky = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    ground = rng.uniform(0.0, 0.7, 3).astype(np.float32)
    horizon = rng.uniform(0.35, 0.7)
    img = np.where(ys < horizon, sky * (0.7 + 0.3 * ys), ground * (1.2 - 0.4 * ys))
    img = np.broadcast_to(img, (height, width, 3)).copy()
    u, v = _grid(width, height, rng, jitter=0.0)
    for _ in range(int(rng.integers(2, 6))):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        blob = _ellipse(u, v, rng.uniform(-0.7, 0.7), rng.uniform(-0.5, 0.7),
                        rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4), softness=0.2)
        img = img * (1 - blob[..., None]) + colour * blob[..., None]
    img += 0.05 * _smooth_noise(rng, height, width, cells=10)[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


_WORDS = ("patient", "report", "findings", "the", "chest", "normal", "of", "and", "page",
          "signed", "date", "impression", "no", "acute", "see", "attached", "referral")


def _text_page(rng, width, height):
    """A scanned page or screenshot: a white background with lines of dark text."""
    page = Image.new("L", (width, height), int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    line = max(8, int(height * rng.uniform(0.05, 0.08)))
    margin = int(width * rng.uniform(0.05, 0.12))
    for y in range(margin, height - line, line + int(line * 0.4)):
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))
        draw.text((margin, y), words, fill=int(rng.integers(0, 60)))
    pixels = np.asarray(page, dtype=np.float32)
    pixels += rng.normal(0, 3, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


_RENDER = {"lateral": _lateral, "inverted": _inverted, "long_bone": _long_bone, "hand": _hand,
           "colour_photo": _colour_photo, "text_page": _text_page, "ct_slice": _ct_slice}


def render_wrong(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """One image of ``kind``: uint8 (height, width) grey, or (height, width, 3) for a photo."""
    if kind not in _RENDER:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _RENDER[kind](rng, width, height)


def _save(pixels: np.ndarray, path: Path, fmt: str, seed: int, index: int) -> Path:
    if fmt == "jpeg":
        Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)
        return path
    from trainer.synth.dicom_writer import VARIANTS, synthetic_dataset, write_dicom

    ds = synthetic_dataset(pixels, VARIANTS[index % len(VARIANTS)], patient=f"wrong-{index:04d}",
                           accession=f"WRG{index:07d}", seed=seed, index=index)
    return write_dicom(ds, path.with_suffix(".dcm"))


def write_wrong_inputs(
    out: Path, n_per_kind: int, seed: int = 0, size_range: tuple[int, int] = (96, 160),
    kinds: tuple[str, ...] = KINDS, fmt: str = "jpeg",
) -> list[tuple[Path, str]]:
    """Write ``n_per_kind`` images of each kind into ``out``; returns (path, kind) pairs.

    ``fmt="dicom"`` writes the kinds in ``DICOM_KINDS`` as DICOM (the same variants as the
    chest generator, MONOCHROME1 included) and skips the others. Names carry the kind
    (``wrong-lateral-0001.jpeg``) because these are test inputs, not a blind demo.
    """
    if fmt not in ("jpeg", "dicom"):
        raise ValueError(f"fmt must be jpeg or dicom, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, kind in enumerate(kinds):
        if fmt == "dicom" and kind not in DICOM_KINDS:
            continue
        for i in range(n_per_kind):
            rng = np.random.default_rng([seed, 31_337, k, i])
            side = int(rng.integers(size_range[0], size_range[1] + 1))
            width = max(int(side * rng.uniform(0.85, 1.2)), 32)
            pixels = render_wrong(rng, kind, width, side)
            path = out / f"wrong-{kind}-{i + 1:04d}.jpeg"
            written.append((_save(pixels, path, fmt, seed, k * 100_000 + i), kind))
    return written
