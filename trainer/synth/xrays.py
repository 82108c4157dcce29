"""A synthetic chest-X-ray-like data set in the Kaggle layout, for demos and tests.

Real X-rays cannot ship with the project, so this draws stylised frontal chest films with
numpy and Pillow: body, lung fields, mediastinum and heart, spine, ribs, clavicles and
diaphragm domes. NORMAL lungs are clear; BACTERIA adds a dense focal (lobar) consolidation in
one lung zone; VIRUS adds a diffuse bilateral interstitial (reticular) haze. Severity, size,
exposure, contrast, noise, rotation and position vary, and some cases are subtle, so the
classes are learnable but not trivially separable. Nothing here is medical data.

Layout and names follow Kaggle's "Chest X-Ray Images (Pneumonia)": ``ROOT/{train,val,test}/
{NORMAL,PNEUMONIA}/``, ``IM-0115-0001.jpeg``, ``NORMAL2-IM-1427-0001.jpeg``,
``person1946_bacteria_4874.jpeg``, ``person1_virus_6.jpeg``; each patient has several images
and all of a patient's images are in one split. Output is deterministic for a seed.
``fmt="dicom"`` writes the same drawings as ``.dcm`` files instead (``trainer.synth.dicom_writer``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from db.exceptions import DatasetError
from trainer.training.data import MARKER

README = "README.txt"
LESIONS = "lesions.json"
LESION_LEVEL = 0.1
LABELS = ("NORMAL", "BACTERIA", "VIRUS")
CLASS_MIX = {"NORMAL": 0.27, "BACTERIA": 0.47, "VIRUS": 0.26}
SPLIT_FRACTIONS = {"test": 0.12, "val": 0.05}
IMAGES_PER_PATIENT = (1, 2, 3, 4, 5)
IMAGES_PER_PATIENT_P = (0.15, 0.30, 0.25, 0.18, 0.12)
SUBTLE_FRACTION = 0.08
JPEG_QUALITY = 90
FORMATS = ("jpeg", "dicom")
_HELD_OUT_STREAM = 7_777_777

README_TEXT = """SYNTHETIC DATA - NOT MEDICAL IMAGES

Written by `cxr synth` (trainer/synth/xrays.py): stylised drawings of chest X-rays made with numpy,
in the folder layout and file naming of the Kaggle "Chest X-Ray Images (Pneumonia)" data set.
NORMAL: clear lungs. BACTERIA: a dense focal consolidation in one lung zone. VIRUS: diffuse
bilateral interstitial haze. For demos and tests only; a model trained on it says nothing
about real patients.
"""


@dataclass(frozen=True)
class PlannedImage:
    split: str
    label: str
    patient: str
    file_name: str

    @property
    def folder(self) -> str:
        return "NORMAL" if self.label == "NORMAL" else "PNEUMONIA"


# --- drawing -------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    field = np.asarray(img, dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipse(u, v, cu, cv, au, av, softness=0.08):
    r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return np.clip((1.0 - r) / softness, 0.0, 1.0)


def _lung_masks(u, v, tilt):
    masks = []
    for side in (-1.0, 1.0):
        cu = side * 0.42
        lung = _ellipse(u, v, cu, -0.02, 0.31 + 0.02 * side * tilt, 0.68, softness=0.35)
        dome = 0.50 - 0.30 * ((u - cu) / 0.3) ** 2 + 0.05 * side
        lung *= np.clip((dome - v) / 0.08 + 0.5, 0.0, 1.0)
        lung *= np.clip((np.abs(u) - 0.1) / 0.08, 0.0, 1.0)
        masks.append(lung)
    heart = _ellipse(u, v, 0.12, 0.30, 0.32, 0.26, softness=0.9)
    masks[1] *= 1.0 - 0.85 * heart
    masks[0] *= 1.0 - 0.5 * _ellipse(u, v, -0.05, 0.3, 0.2, 0.22, softness=0.6)
    return masks[0], masks[1], heart


def _anatomy(rng, u, v):
    """Intensity in ~[0, 1] (bright = dense) of a normal chest, and the two lung masks."""
    shoulders = _ellipse(u, v, 0.0, 0.15, 1.05, 1.3, softness=0.3)
    body = np.clip(shoulders * (1.2 - 0.15 * np.abs(v)), 0, 1)
    left, right, heart = _lung_masks(u, v, rng.uniform(-1, 1))
    lungs = np.maximum(left, right)
    mediastinum = np.exp(-((u / 0.16) ** 2)) * np.clip(v + 0.9, 0, 1)
    spine = np.exp(-((u / 0.06) ** 2)) * (0.8 + 0.2 * np.cos(v * 40))
    img = 0.05 + 0.45 * body + 0.15 * mediastinum + 0.10 * spine + 0.12 * heart
    img -= 0.38 * lungs
    spacing = rng.uniform(0.12, 0.15)
    phase = rng.uniform(-0.04, 0.04)
    au = np.abs(u)
    t = (v - 0.25 * au - 0.30 * (au - 0.3) ** 2 + 0.72 - phase) / spacing
    gap = (t - np.round(t)) * spacing
    ribs = np.exp(-((gap / 0.03) ** 2)) * (au > 0.08) * (t > -0.5) * (t < 8.5)
    img += 0.09 * ribs * (lungs + 0.3 * body * (1 - lungs))
    clav = np.exp(-(((v - (-0.70 + 0.20 * au)) / 0.035) ** 2)) * (au > 0.1) * (au < 0.65)
    img += 0.12 * clav
    vessels = _smooth_noise(rng, *u.shape, cells=22)
    hilum = np.exp(-(((au - 0.22) / 0.25) ** 2 + ((v - 0.0) / 0.4) ** 2))
    img += 0.06 * lungs * np.exp(-((vessels / 0.2) ** 2)) * (0.3 + hilum)
    img += 0.04 * _smooth_noise(rng, *u.shape, cells=6) * body
    return img, left, right


def _consolidation(rng, u, v, left, right, strength):
    """BACTERIA: one dense, fluffy opacity filling part of one lung zone (lobar pattern)."""
    side = rng.choice([-1.0, 1.0])
    zone = rng.choice([-0.4, -0.05, 0.3])
    cu = side * rng.uniform(0.32, 0.48)
    cv = zone + rng.uniform(-0.08, 0.08)
    au, av = rng.uniform(0.16, 0.28), rng.uniform(0.14, 0.24)
    blob = _ellipse(u, v, cu, cv, au, av, softness=rng.uniform(0.4, 0.8))
    texture = np.clip(0.75 + 0.35 * _smooth_noise(rng, *u.shape, cells=12), 0, 1.2)
    lung = left if side < 0 else right
    return strength * 0.55 * blob * texture * np.clip(lung * 1.3, 0, 1)


def _interstitial(rng, u, v, left, right, strength):
    """VIRUS: diffuse bilateral haze with a reticular (net-like) pattern, more in lower zones."""
    lungs = np.maximum(left, right)
    field = _smooth_noise(rng, *u.shape, cells=int(rng.integers(16, 26)))
    reticular = np.exp(-((field / 0.25) ** 2))
    gradient = 0.55 + 0.45 * np.clip(v + 0.5, 0, 1)
    haze = 0.55 + 0.45 * reticular
    return strength * 0.28 * haze * gradient * lungs


def _noted(lesions: list | None, kind: str, opacity: np.ndarray) -> np.ndarray:
    """``opacity``, its box (x0, y0, x1, y1 as fractions of width and height, where it
    reaches LESION_LEVEL of its peak) appended to ``lesions`` when given."""
    peak = float(opacity.max())
    if lesions is not None and peak > 0:
        rows, cols = np.nonzero(opacity >= LESION_LEVEL * peak)
        h, w = opacity.shape
        box = [cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h]
        lesions.append({"kind": kind, "box": [round(float(b), 4) for b in box]})
    return opacity


def render_xray(rng: np.random.Generator, label: str, width: int, height: int,
                lesions: list | None = None) -> np.ndarray:
    """One grayscale uint8 image (height, width) of class ``label`` (NORMAL/BACTERIA/VIRUS);
    where each opacity was drawn is appended to ``lesions`` when given (see ``_noted``)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    angle = math.radians(rng.uniform(-6, 6))
    scale = rng.uniform(0.88, 1.1)
    du, dv = rng.uniform(-0.08, 0.08, size=2)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    x = (xs / (width - 1)) * 2 - 1
    y = (ys / (height - 1)) * 2 - 1
    x, y = x / scale - du, y / scale - dv
    u = math.cos(angle) * x - math.sin(angle) * y
    v = math.sin(angle) * x + math.cos(angle) * y
    img, left, right = _anatomy(rng, u, v)
    subtle = rng.random() < SUBTLE_FRACTION
    strength = rng.uniform(0.35, 0.6) if subtle else rng.uniform(0.7, 1.2)
    if label == "BACTERIA":
        img += _noted(lesions, "consolidation", _consolidation(rng, u, v, left, right, strength))
        if rng.random() < 0.3:
            img += _noted(lesions, "interstitial",
                          _interstitial(rng, u, v, left, right, 0.25 * strength))
    elif label == "VIRUS":
        img += _noted(lesions, "interstitial", _interstitial(rng, u, v, left, right, strength))
        if rng.random() < 0.25:
            img += _noted(lesions, "consolidation",
                          _consolidation(rng, u, v, left, right, 0.35 * strength))
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08)
    img += rng.normal(0, rng.uniform(0.01, 0.04), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels, mode="L").save(path, format="JPEG", quality=JPEG_QUALITY)


def _save(pixels: np.ndarray, path: Path, fmt: str, *, seed: int, index: int,
          patient: str) -> Path:
    """Write one drawing as ``fmt``; returns the path (``.dcm`` instead of ``.jpeg``)."""
    if fmt == "jpeg":
        _save_jpeg(pixels, path)
        return path
    from trainer.synth.dicom_writer import VARIANTS, synthetic_dataset, write_dicom

    ds = synthetic_dataset(
        pixels, VARIANTS[index % len(VARIANTS)], patient=patient, accession=f"SYN{index:07d}",
        seed=seed, index=index, modality="CR" if index % 3 == 2 else "DX",
        view="AP" if index % 4 == 3 else "PA",
    )
    return write_dicom(ds, path.with_suffix(".dcm"))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DatasetError(f"unknown synthetic image format {fmt!r} (jpeg or dicom)")


def _image_size(rng, size_range: tuple[int, int]) -> tuple[int, int]:
    side = int(rng.integers(size_range[0], size_range[1] + 1))
    aspect = rng.uniform(0.85, 1.2)
    return max(int(side * aspect), 16), side


# --- planning ------------------------------------------------------------------------------


def _class_counts(n: int) -> dict[str, int]:
    normal = round(n * CLASS_MIX["NORMAL"])
    bacteria = round(n * CLASS_MIX["BACTERIA"])
    return {"NORMAL": normal, "BACTERIA": bacteria, "VIRUS": n - normal - bacteria}


def _patient_sizes(rng, total: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice(IMAGES_PER_PATIENT, p=IMAGES_PER_PATIENT_P)))
    sizes[-1] -= sum(sizes) - total
    return [s for s in sizes if s > 0]


def _assign_splits(rng, sizes: list[int]) -> list[str]:
    """Split patients (not images): test, then val, get their share; one of each goes first."""
    order = rng.permutation(len(sizes))
    total = sum(sizes)
    splits = ["train"] * len(sizes)
    filled = {"test": 0, "val": 0}
    for rank, idx in enumerate(order):
        if len(sizes) >= 3 and rank < 2:
            split = ("test", "val")[rank]
        else:
            split = next(
                (s for s in ("test", "val") if filled[s] < SPLIT_FRACTIONS[s] * total), "train"
            )
            if rank == len(order) - 1 and "train" not in splits:
                split = "train"
        splits[idx] = split
        if split in filled:
            filled[split] += sizes[idx]
    return splits


def plan_dataset(n: int, seed: int = 0) -> list[PlannedImage]:
    """Every image's split, label, patient and Kaggle file name (no pixels yet)."""
    if n < 3:
        raise DatasetError(f"need at least 3 images for 3 classes, got {n}")
    rng = np.random.default_rng([seed, 0])
    plan: list[PlannedImage] = []
    pneumonia_ids = iter(rng.permutation(np.arange(1, 4 * n + 2)).tolist())
    normal_ids = iter(rng.permutation(np.arange(1, 4 * n + 2)).tolist())
    image_counter = iter(rng.permutation(np.arange(1, 8 * n + 2)).tolist())
    for label, count in _class_counts(n).items():
        sizes = _patient_sizes(rng, count)
        for size, split in zip(sizes, _assign_splits(rng, sizes), strict=True):
            if label == "NORMAL":
                prefix = "NORMAL2-IM" if rng.random() < 0.5 else "IM"
                patient = f"{prefix}-{next(normal_ids):04d}"
                names = [f"{patient}-{k:04d}.jpeg" for k in range(1, size + 1)]
            else:
                patient = f"person{next(pneumonia_ids)}"
                names = [
                    f"{patient}_{label.lower()}_{m}.jpeg"
                    for m in sorted(next(image_counter) for _ in range(size))
                ]
            plan.extend(PlannedImage(split, label, patient, name) for name in names)
    return plan


# --- writing -------------------------------------------------------------------------------


def generate_dataset(
    out: Path, n: int, seed: int = 0, size_range: tuple[int, int] = (96, 160),
    fmt: str = "jpeg",
) -> dict[str, dict[str, int]]:
    """Write ``n`` images under ``out`` in the Kaggle layout; returns counts[split][label].

    ``fmt`` is ``jpeg`` or ``dicom`` (the same drawings either way). Refuses a folder that
    already holds a data set, so two runs never mix.
    """
    _check_format(fmt)
    out = Path(out)
    if any((out / split).exists() for split in ("train", "val", "test")):
        raise DatasetError(f"{out} already holds a data set; choose a new folder")
    plan = plan_dataset(n, seed)
    counts: dict[str, dict[str, int]] = {
        split: dict.fromkeys(LABELS, 0) for split in ("train", "val", "test")
    }
    for split in counts:
        for folder in ("NORMAL", "PNEUMONIA"):
            (out / split / folder).mkdir(parents=True, exist_ok=True)
    where: dict[str, list] = {}
    for index, item in enumerate(plan):
        rng = np.random.default_rng([seed, 1, index])
        width, height = _image_size(rng, size_range)
        lesions: list = []
        _save(render_xray(rng, item.label, width, height, lesions),
              out / item.split / item.folder / item.file_name, fmt,
              seed=seed, index=index, patient=item.patient)
        if lesions:
            where[f"{item.split}/{item.folder}/{item.file_name}"] = lesions
        counts[item.split][item.label] += 1
    (out / README).write_text(README_TEXT)
    _write_lesions(out, where)
    meta = {
        "synthetic": True,
        "generator": "trainer.synth.xrays",
        "n": n,
        "seed": seed,
        "size_range": list(size_range),
        "format": fmt,
        "counts": counts,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def _write_lesions(out: Path, where: dict[str, list]) -> None:
    (out / LESIONS).write_text(json.dumps({
        "about": "where each drawn opacity lies: box = x0, y0, x1, y1 as fractions of the "
                 f"image's width and height, where the opacity reaches {LESION_LEVEL} of its "
                 "peak; NORMAL images have none",
        "images": where,
    }, indent=1) + "\n")


def held_out_images(
    out: Path, n: int, seed: int = 0, size_range: tuple[int, int] = (96, 160),
    fmt: str = "jpeg",
) -> list[tuple[Path, str]]:
    """Write ``n`` extra images (not in any generated data set) into ``out``, for inbox demos.

    Returns (path, true label) pairs; labels cycle NORMAL, BACTERIA, VIRUS. Names look like
    ``synthetic-s0-0001.jpeg`` (``.dcm``), so the truth is not in the file name the service sees.
    """
    _check_format(fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        rng = np.random.default_rng([seed, _HELD_OUT_STREAM, i])
        label = LABELS[i % len(LABELS)]
        width, height = _image_size(rng, size_range)
        path = _save(render_xray(rng, label, width, height),
                     out / f"synthetic-s{seed}-{i + 1:04d}.jpeg", fmt,
                     seed=seed + _HELD_OUT_STREAM, index=i, patient=f"held-out-{i + 1:04d}")
        written.append((path, label))
    return written
