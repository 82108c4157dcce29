"""The Kaggle chest X-ray layout as records, patient-grouped splits and per-stage views.

The official val split has 16 images and no virus case, and a patient often has several
images, so validation is re-drawn from train+val by patient (stratified), and the official
test split is kept for the final evaluation only.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from db.exceptions import DatasetError
from db.vocabulary import CASCADE_CLASSES, Stage
from trainer.imaging.checksum import new_digest, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FOLDERS = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
MARKER = "SYNTHETIC"  # file that `cxr synth` leaves in a data set root
"""Files taken from the class folders (the decoder itself tells formats by content)."""

_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One image: where it is, the official split it came from, its 3-class label, its patient."""

    path: Path
    split: str
    label3: str
    patient: str


@dataclass(frozen=True)
class Splits:
    """Patient-disjoint train / validation / test records."""

    train: list[Record]
    val: list[Record]
    test: list[Record]


def parse_name(file_name: str, folder: str) -> tuple[str, str]:
    """(label3, patient id) from a Kaggle file name in ``folder`` (NORMAL or PNEUMONIA)."""
    stem = Path(file_name).stem
    if folder == "PNEUMONIA":
        m = _PNEUMONIA_NAME.match(stem)
        if m:
            return m.group(2).upper(), m.group(1).lower()
    else:
        m = _NORMAL_NAME.match(stem)
        if m:
            return "NORMAL", m.group(1).upper()
    expected = "personN_bacteria_M or personN_virus_M" if folder == "PNEUMONIA" else (
        "IM-XXXX-YYYY or NORMAL2-IM-XXXX-YYYY"
    )
    raise DatasetError(f"unknown file name {file_name!r} in {folder}/ (expected {expected})")


def scan_dataset(root: Path | str) -> list[Record]:
    """All images under ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}``; ``val`` may be absent."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    records: list[Record] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split == "val":
                continue
            raise DatasetError(
                f"{root} is not in the Kaggle layout: missing {split}/ "
                "(expected ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg)"
            )
        for folder in FOLDERS:
            class_dir = split_dir / folder
            if not class_dir.is_dir():
                raise DatasetError(f"{root} is not in the Kaggle layout: missing {split}/{folder}/")
            for path in sorted(class_dir.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                label3, patient = parse_name(path.name, folder)
                records.append(Record(path, split, label3, patient))
    return records


def _check_classes(records: list[Record], where: str) -> None:
    counts = Counter(r.label3 for r in records)
    empty = [c for c in CASCADE_CLASSES if counts[c] == 0]
    if empty:
        missing = ", ".join(empty)
        raise DatasetError(f"{where} has no {missing} image (class counts: {dict(counts)})")


def split_records(records: list[Record], *, val_fraction: float = 0.15, seed: int = 0) -> Splits:
    """Patient-grouped, label-stratified validation split of train+val; official test kept as is.

    Each patient joins the stratum of their most frequent label; within a stratum, shuffled
    patients go to validation until it holds ``val_fraction`` of that stratum's images.
    Patients that also appear in the test split are dropped from train/val (they would leak).
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val fraction must be between 0 and 1, got {val_fraction}")
    test = [r for r in records if r.split == "test"]
    test_patients = {r.patient for r in test}
    pool = [r for r in records if r.split != "test"]
    leaked = [r for r in pool if r.patient in test_patients]
    if leaked:
        log.warning("dropping %d train/val images of patients also in test", len(leaked))
        pool = [r for r in pool if r.patient not in test_patients]
    _check_classes(pool, "train+val")
    _check_classes(test, "test")

    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in pool:
        by_patient[r.patient].append(r)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient, recs in sorted(by_patient.items()):
        majority = Counter(r.label3 for r in recs).most_common()
        top = max(c for _, c in majority)
        label = min(lbl for lbl, c in majority if c == top)
        strata[label].append(patient)

    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted(strata):
        patients = strata[label]
        rng.shuffle(patients)
        goal = val_fraction * sum(len(by_patient[p]) for p in patients)
        taken = 0
        for p in patients[:-1]:  # always leave one patient to train
            if taken >= goal:
                break
            val_patients.add(p)
            taken += len(by_patient[p])
    train = [r for r in pool if r.patient not in val_patients]
    val = [r for r in pool if r.patient in val_patients]
    return Splits(train=train, val=val, test=test)


def stage_view(records: list[Record], stage: str) -> tuple[list[Path], list[int]]:
    """(paths, 0/1 labels) for a stage: pneumonia = NORMAL vs PNEUMONIA; infection =
    BACTERIA vs VIRUS over pneumonia images only."""
    if stage == "pneumonia":
        chosen = records
        labels = [0 if r.label3 == "NORMAL" else 1 for r in chosen]
    elif stage == "infection":
        chosen = [r for r in records if r.label3 != "NORMAL"]
        labels = [1 if r.label3 == "VIRUS" else 0 for r in chosen]
    else:
        raise DatasetError(f"unknown stage {stage!r} (choose from {', '.join(Stage)})")
    return [r.path for r in chosen], labels


def class_weights(labels: list[int]) -> dict[int, float]:
    """Balanced Keras class weights ``n / (2 * count)`` from the training labels."""
    counts = Counter(int(v) for v in labels)
    n = len(labels)
    for c in (0, 1):
        if counts[c] == 0:
            raise DatasetError(f"training data has no example of class {c}")
    return {c: n / (2.0 * counts[c]) for c in (0, 1)}


def dataset_fingerprint(records: list[Record], root: Path | str) -> str:
    """sha256 over sorted (relative path, content hash): changes when any file or name changes."""
    root = Path(root)
    h = new_digest()
    for rel, path in sorted((r.path.relative_to(root).as_posix(), r.path) for r in records):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(path).encode())
        h.update(b"\n")
    return h.hexdigest()


def summarize(splits: Splits) -> dict[str, dict[str, int]]:
    """Image counts per split and 3-class label, for logs and the report."""
    out = {}
    for name in ("train", "val", "test"):
        counts = Counter(r.label3 for r in getattr(splits, name))
        out[name] = {c: counts[c] for c in CASCADE_CLASSES}
    return out


def is_synthetic(root: Path | str) -> bool:
    """Whether ``root`` was written by ``cxr synth`` (it leaves a marker file in the root)."""
    return (Path(root) / MARKER).exists()
