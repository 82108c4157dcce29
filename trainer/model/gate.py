"""The input gate: "this is not something I can read", decided before any label is given.

Three layers, cheapest first, each refusal (``Refusal``) with its own reason a person can act on:

* Pixel checks (``check_pixels``) on the decoded image: nearly constant, inverted (a negative
  chest film), a text page or screenshot. The decoder reduces every file to luminance, so a
  colour photograph cannot be seen in its pixels: ``check_file_colour`` looks at the file's own
  colours (a small draft decode) and ``check_colour`` at any RGB array.
* A layout gate: the learned score of ``trainer.model.ood`` on an 8 x 8 thumbnail. Pooled CNN
  features forget where things are; the thumbnail remembers (a round CT section, a hand).
* A feature gate: the same score on the stage-1 model's own penultimate features
  (``trainer.model.gate_bundle.FeatureModel`` gives them with the probability, one pass).

Both learned gates are held in one ``InputGate``, each thresholded for half of the allowed
false refusals, so together they refuse at most that rate of in-distribution images. DICOM
MONOCHROME1 is already inverted by the decoder, so a correctly labelled film is never
"inverted" here; only a negative written as MONOCHROME2 (or a JPEG of one) is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.model.ood import Gate, cross_fit_gate, fit_gate
from trainer.model.refusal import Refusal

__all__ = ["Refusal", "Gate", "InputGate", "check_pixels", "check_file_colour", "screen"]

CONSTANT_RANGE = 12.0
"""Grey levels between the 1st and 99th percentile below which an image is "nearly constant"."""

TEXT_BLANK_LINES = 0.12
"""Share of rows (or columns) that are blank background above which an image with a bright
(>= 170) modal grey is a page: margins and the gaps between lines of text. A radiograph has
body or air in every row; the synthetic chest films reach at most 0.09 (with a dark mode)."""

INVERTED_MARGIN = 10.0
"""Grey levels by which the lung fields must be brighter than the mediastinum to call a frontal
film inverted (a normal film has them 40-120 levels darker)."""

COLOUR_SPREAD = 12.0
"""Spread of chromaticity (``colour_spread``) above which an image is a colour photograph.
A uniform tint (sepia, a blue cast) has none in principle; JPEG rounding and a channel clipped
at white bring tinted synthetic films to at most 8.4, the synthetic photos start at 23.7."""


def _grey(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got shape {arr.shape}")
    return arr.astype(np.float32)


def _percentiles(grey: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(grey, qs)`` (linear interpolation); for whole grey levels 0-255 from a
    histogram instead of a sort (the same values, a tenth of the time)."""
    flat = grey.ravel()
    whole = flat.size and flat.min() >= 0 and flat.max() <= 255 and np.array_equal(
        flat, np.floor(flat))
    if not whole:
        return [float(v) for v in np.percentile(flat, qs)]
    cum = np.cumsum(np.bincount(flat.astype(np.int64), minlength=256))
    out = []
    for q in qs:
        pos = q / 100.0 * (flat.size - 1)
        lo_k, frac = int(math.floor(pos)), pos - math.floor(pos)
        lo_v = int(np.searchsorted(cum, lo_k, side="right"))
        hi_v = int(np.searchsorted(cum, min(lo_k + 1, flat.size - 1), side="right"))
        out.append(lo_v + frac * (hi_v - lo_v))
    return out


def check_constant(grey: np.ndarray) -> Refusal | None:
    """A blank, black or flat image (a failed export, a placeholder)."""
    lo, hi = _percentiles(grey, (1, 99))
    spread = float(hi - lo)
    if spread >= CONSTANT_RANGE:
        return None
    return Refusal("constant", f"nearly constant image (grey levels span {spread:.0f} of 255):"
                   " a blank or failed export; resend the original image", spread,
                   CONSTANT_RANGE)


def blank_line_share(grey: np.ndarray) -> tuple[float, float]:
    """(modal grey, share of rows or columns, whichever is larger, with >= 90 % of their
    pixels within 15 grey levels of it)."""
    hist = np.bincount(np.clip(grey, 0, 255).astype(np.int64).ravel(), minlength=256)
    mode = float(np.argmax(hist))
    near = np.abs(grey - mode) <= 15
    rows, cols = (near.mean(axis=1) >= 0.9).mean(), (near.mean(axis=0) >= 0.9).mean()
    return mode, float(max(rows, cols))


def check_text(grey: np.ndarray) -> Refusal | None:
    """A scanned page or a screenshot: a flat bright background, blank margins and line gaps,
    and darker strokes."""
    mode, blank = blank_line_share(grey)
    if mode < 170 or blank < TEXT_BLANK_LINES or float(grey.min()) > mode - 40:
        return None
    return Refusal("text", f"looks like a page of text or a screenshot ({blank:.0%} of its lines"
                   " are blank bright background), not a radiograph; send the image itself,"
                   " not a document about it", blank, TEXT_BLANK_LINES)


def inversion_contrast(grey: np.ndarray) -> float:
    """Median grey of the lung fields minus that of the mediastinum band (0-255 scale).

    Frontal films have dark lungs either side of a bright spine and heart, so this is strongly
    negative; a negative image makes it positive. Medians over broad bands keep a dense
    consolidation, a few degrees of rotation or a shifted patient from flipping the sign.
    """
    h, w = grey.shape
    rows = slice(int(0.25 * h), int(0.65 * h))
    centre = grey[rows, int(0.45 * w):int(0.55 * w)]
    left = grey[rows, int(0.15 * w):int(0.33 * w)]
    right = grey[rows, int(0.67 * w):int(0.85 * w)]
    lungs = min(float(np.median(left)), float(np.median(right)))
    return lungs - float(np.median(centre))


def corner_contrast(grey: np.ndarray) -> float:
    """Median grey of the two top corners minus the image's median (0-255 scale): the air
    beside the neck is black on a film, so a negative has bright corners."""
    h, w = grey.shape
    k = max(2, min(h, w) // 8)
    corners = np.concatenate([grey[:k, :k].ravel(), grey[:k, -k:].ravel()])
    return float(np.median(corners) - np.median(grey))


def check_inverted(grey: np.ndarray) -> Refusal | None:
    """A negative: lungs brighter than the mediastinum, and top corners brighter than the
    image (two signs, so that a lateral view, whose centre is lung and whose spine lies to one
    side, is left to the layout gate and gets that reason instead)."""
    contrast = inversion_contrast(grey)
    if contrast <= INVERTED_MARGIN or corner_contrast(grey) <= 0:
        return None
    return Refusal("inverted", "looks inverted (a negative: the lungs are brighter than the"
                   f" spine by {contrast:.0f} grey levels); export the image as displayed"
                   " (MONOCHROME2, bones white) and resend", contrast, INVERTED_MARGIN)


def colour_spread(rgb: np.ndarray) -> float:
    """Spread of chromaticity of an (H, W, 3) image (0-255 scale), 0 for any grey image and for
    any uniform tint: chroma divided by brightness, so a sepia or blue cast that scales with
    the grey level stays constant. Near-black pixels, whose chromaticity is noise, are left
    out."""
    arr = np.asarray(rgb, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return 0.0
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    total = r + g + b
    lit = total > 60
    if lit.sum() < 16:
        return 0.0
    c1 = (r - g)[lit] / total[lit]
    c2 = ((r + g) / 2 - b)[lit] / total[lit]
    return float(255 * math.hypot(float(np.std(c1)), float(np.std(c2))))


def check_colour(rgb: np.ndarray) -> Refusal | None:
    """A colour photograph (a phone picture of anything, a clinical photo)."""
    spread = colour_spread(rgb)
    if spread <= COLOUR_SPREAD:
        return None
    return Refusal("colour", f"a colour photograph (colour spread {spread:.0f}, radiographs"
                   f" have none above {COLOUR_SPREAD:.0f}); send the radiograph file itself",
                   spread, COLOUR_SPREAD)


def check_file_colour(path: Path, side: int = 64) -> Refusal | None:
    """``check_colour`` on a JPEG or PNG file's own colours, decoded small (draft mode).

    Call it after the file decoded (so it is known to be a sound JPEG/PNG); a DICOM or a file
    Pillow cannot open returns None: the decoder has already said what was wrong with it.
    """
    from PIL import Image

    try:
        with Image.open(path, formats=["JPEG", "PNG"]) as img:
            if img.mode in ("L", "LA", "I", "I;16", "1", "F"):
                return None
            img.draft("RGB", (side, side))
            img = img.convert("RGB")
            img.thumbnail((side, side))
            return check_colour(np.asarray(img))
    except Exception:  # not ours to judge: decode_image reports bad files
        return None


def check_pixels(pixels: np.ndarray) -> Refusal | None:
    """The cheap checks on decoded pixels ((H, W, 3) uint8 as the decoder gives, or grey), in
    order constant, inverted, text, colour; the first that fires, or None. Images over 128 px
    are read at every second pixel: the checks are coarse statistics, and it halves the cost."""
    arr = np.asarray(pixels)
    step = 2 if min(arr.shape[:2]) > 128 else 1
    small = arr[::step, ::step]
    tinted = small.ndim == 3 and not (np.array_equal(small[..., 0], small[..., 1])
                                      and np.array_equal(small[..., 1], small[..., 2]))
    grey = _grey(small) if tinted or small.ndim == 2 else small[..., 0].astype(np.float32)
    for check in (check_constant, check_inverted, check_text):
        refusal = check(grey)
        if refusal is not None:
            return refusal
    return check_colour(small) if tinted else None


LAYOUT_SIDE = 8
"""The layout gate reads an 8 x 8 thumbnail: enough for where the body, lungs and mediastinum
lie, too coarse for any finding (64 values, estimable from a few dozen images)."""

LAYOUT_DIMS = 8
"""At most 8 principal dimensions for the layout: how a film varies in layout (position,
scale, rotation, exposure, habitus) is low-dimensional. With 16, the Mahalanobis term divided
a dense consolidation (one bright blob in one lung) by the small variances of the minor
directions and refused about 1 % of synthetic pneumonia films: the gate must never refuse a
film for its disease. Past 8 dimensions a blob only adds residual energy, which it raises
little."""


def layout(pixels: np.ndarray, side: int = LAYOUT_SIDE) -> np.ndarray:
    """The (side * side,) block-mean thumbnail of an image's grey levels, in [0, 1].

    Pooled CNN features are blind to where things are (a round CT section and a chest film
    can pool alike); this keeps the coarse layout, at no cost beside the forward pass."""
    grey = _grey(pixels)
    rows = np.linspace(0, grey.shape[0], side + 1).astype(int)
    cols = np.linspace(0, grey.shape[1], side + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(grey, rows[:-1], axis=0), cols[:-1], axis=1)
    area = np.outer(np.diff(rows), np.diff(cols))
    return (sums / area / 255.0).ravel().astype(np.float32)


def layouts(images: np.ndarray, side: int = LAYOUT_SIDE) -> np.ndarray:
    """``layout`` of each image of a batch. A batch of grey x 3 images (what the decoder gives)
    whose sides divide by ``side`` takes a shortcut with the same values: one channel, block
    means by a reshape (a tenth of the time at 224 px, which keeps the gate within a few
    per cent of a CPU forward pass)."""
    arr = np.asarray(images)
    if not len(arr):
        return np.zeros((0, side * side), np.float32)
    n, h, w = arr.shape[:3]
    grey3 = arr.ndim == 4 and arr.shape[3] == 3 and np.array_equal(
        arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    if not (grey3 and h % side == 0 and w % side == 0):
        return np.stack([layout(im, side) for im in arr])
    blocks = arr[..., 0].astype(np.float32).reshape(n, side, h // side, side, w // side)
    return (blocks.mean(axis=(2, 4)) / 255.0).reshape(n, -1).astype(np.float32)


@dataclass
class InputGate:
    """The learned part of the gate: a layout gate and a feature gate, refusing on either."""

    features: Gate
    layout: Gate

    @property
    def max_false_refusal(self) -> float:
        return float(self.features.info.get("max_false_refusal", 0.0)) * 2

    def scores(self, features: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature scores, layout scores) for a batch: features (N, D), pixels (N, H, W, 3)."""
        return self.features.score(features), self.layout.score(layouts(pixels))

    def refusals(self, features: np.ndarray, pixels: np.ndarray) -> list[Refusal | None]:
        """Per image: the layout refusal, else the feature refusal, else None."""
        f, lay = self.scores(features, pixels)
        return [self.layout.refusal(b) or self.features.refusal(a)
                for a, b in zip(f, lay, strict=True)]


def _tag(gate: Gate, what: str) -> Gate:
    gate.info["input"] = what
    return gate


def fit_input_gate(features_train: np.ndarray, features_val: np.ndarray,
                   pixels_train: np.ndarray, pixels_val: np.ndarray,
                   max_false_refusal: float = 0.01) -> InputGate:
    """At training time: fitted on the training images, thresholded on the validation ones."""
    half = max_false_refusal / 2
    return InputGate(
        _tag(fit_gate(features_train, features_val, half), "features"),
        _tag(fit_gate(layouts(pixels_train), layouts(pixels_val), half, LAYOUT_DIMS), "layout"))


def cross_fit_input_gate(features: np.ndarray, pixels: np.ndarray,
                         max_false_refusal: float = 0.01) -> InputGate:
    """From one small reference set (leave-one-out thresholds, see ``cross_fit_gate``)."""
    half = max_false_refusal / 2
    return InputGate(_tag(cross_fit_gate(features, half), "features"),
                     _tag(cross_fit_gate(layouts(pixels), half, cap=LAYOUT_DIMS), "layout"))


def screen(pixels: np.ndarray, features: np.ndarray, gate: InputGate | None,
           paths: list[Path] | None = None) -> list[Refusal | None]:
    """The whole gate for a batch, as the worker, ``cxr classify`` and ``cxr explain`` apply it:
    file colour (when ``paths`` are given), pixel checks, then the learned gates (when the
    bundle has one). ``features`` are ``FeatureModel.predict``'s for the same ``pixels``."""
    verdicts: list[Refusal | None] = [
        (check_file_colour(paths[i]) if paths else None) or check_pixels(px)
        for i, px in enumerate(pixels)]
    if gate is None:
        return verdicts
    learned = gate.refusals(features, pixels)
    return [v or w for v, w in zip(verdicts, learned, strict=True)]
