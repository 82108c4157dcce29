"""Synthetic data set: Kaggle layout and names, patient grouping, class mix, determinism."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from helpers_data import load_lesions
from PIL import Image

from db.exceptions import DatasetError
from trainer.synth.xrays import (
    LESIONS,
    MARKER,
    README,
    generate_dataset,
    held_out_images,
    plan_dataset,
    render_xray,
)

PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+\.jpeg$")
NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d{4})-\d{4}\.jpeg$")
SIZE_RANGE = (40, 56)


def _parse(path):
    """(label, patient) the way the Kaggle names encode them."""
    if path.parent.name == "NORMAL":
        match = NORMAL_NAME.match(path.name)
        assert match, path.name
        return "NORMAL", match.group(1)
    match = PNEUMONIA_NAME.match(path.name)
    assert match, path.name
    return match.group(2).upper(), match.group(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "chest_xray"
    counts = generate_dataset(root, 240, seed=3, size_range=SIZE_RANGE)
    return root, counts


def test_layout_names_and_markers(dataset):
    root, counts = dataset
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [MARKER, README, LESIONS, "test", "train", "val"]
    )
    assert "SYNTHETIC" in (root / README).read_text()
    files = sorted(root.rglob("*.jpeg"))
    assert len(files) == 240
    found = Counter()
    for path in files:
        split, folder = path.parent.parent.name, path.parent.name
        assert split in ("train", "val", "test") and folder in ("NORMAL", "PNEUMONIA")
        label, _ = _parse(path)
        assert (label == "NORMAL") == (folder == "NORMAL")
        found[split, label] += 1
    assert dict(found) == {(s, lab): n for s, per in counts.items() for lab, n in per.items() if n}
    assert any(p.name.startswith("NORMAL2-IM-") for p in files)
    assert any(p.name.startswith("IM-") for p in files)


def test_images_are_grayscale_jpegs_of_varied_size(dataset):
    root, _ = dataset
    sizes = set()
    for path in sorted(root.rglob("*.jpeg"))[:40]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "L"
            assert SIZE_RANGE[0] <= img.height <= SIZE_RANGE[1]
            sizes.add(img.size)
    assert len(sizes) > 5


def test_patients_have_several_images_in_one_split(dataset):
    root, _ = dataset
    splits, labels = defaultdict(set), defaultdict(set)
    for path in root.rglob("*.jpeg"):
        label, patient = _parse(path)
        splits[patient].add(path.parent.parent.name)
        labels[patient].add(label)
    per_patient = Counter(_parse(p)[1] for p in root.rglob("*.jpeg"))
    assert all(len(s) == 1 for s in splits.values())
    assert all(len(s) == 1 for s in labels.values())
    assert np.mean(list(per_patient.values())) > 2.0
    assert max(per_patient.values()) >= 4


def test_class_mix_and_splits(dataset):
    _, counts = dataset
    totals = Counter()
    for per in counts.values():
        totals.update(per)
    assert totals == {"NORMAL": 65, "BACTERIA": 113, "VIRUS": 62}
    for split in ("train", "val", "test"):
        assert all(counts[split][label] > 0 for label in totals), split
    test_share = sum(counts["test"].values()) / 240
    val_share = sum(counts["val"].values()) / 240
    assert 0.08 < test_share < 0.2 and 0.03 < val_share < 0.12


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpeg")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", 30, seed=11, size_range=SIZE_RANGE)
    b = generate_dataset(tmp_path / "b", 30, seed=11, size_range=SIZE_RANGE)
    generate_dataset(tmp_path / "c", 30, seed=12, size_range=SIZE_RANGE)
    assert a == b
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_existing_dataset_and_tiny_n(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(DatasetError, match="already holds"):
        generate_dataset(root, 10)
    with pytest.raises(DatasetError):
        plan_dataset(2)


def test_pathology_changes_lungs_in_the_expected_direction():
    """Mean lung-field brightness: consolidation and haze make lungs denser than NORMAL."""

    def lung_mean(label):
        means = []
        for i in range(12):
            pixels = render_xray(np.random.default_rng([0, i]), label, 64, 64).astype(float)
            means.append(pixels[16:44, 6:26].mean() + pixels[16:44, 38:58].mean())
        return np.mean(means)

    normal, bacteria, virus = (lung_mean(lab) for lab in ("NORMAL", "BACTERIA", "VIRUS"))
    assert bacteria > normal and virus > normal
    with pytest.raises(ValueError):
        render_xray(np.random.default_rng(0), "FUNGUS", 32, 32)


def test_the_generator_records_where_it_drew_each_opacity(dataset):
    """lesions.json: every pneumonia image has its opacities (a consolidation in every
    BACTERIA image), none for NORMAL; a box holds the densest pixels of its lung."""
    root, counts = dataset
    lesions = load_lesions(root)
    pneumonia = {p.relative_to(root).as_posix() for p in root.rglob("PNEUMONIA/*.jpeg")}
    assert set(lesions) == pneumonia
    for path, drawn in lesions.items():
        kinds = [d["kind"] for d in drawn]
        assert "consolidation" in kinds if "_bacteria_" in path else "interstitial" in kinds
        for d in drawn:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    plain = render_xray(np.random.default_rng(0), "BACTERIA", 64, 64)
    drawn: list = []
    np.testing.assert_array_equal(  # recording changes no pixel
        render_xray(np.random.default_rng(0), "BACTERIA", 64, 64, drawn), plain)
    inside, mirrored = [], []
    for i in range(12):  # the box is denser than the same place in the other lung
        drawn = []
        pixels = render_xray(np.random.default_rng([0, i]), "BACTERIA", 64, 64, drawn)
        x0, y0, x1, y1 = (round(v * 64) for v in drawn[0]["box"])
        inside.append(pixels[y0:y1, x0:x1].mean())
        mirrored.append(pixels[y0:y1, 64 - x1:64 - x0].mean())
    assert np.mean(inside) > np.mean(mirrored) + 15


def test_a_lesion_box_covers_the_opacity_above_a_tenth_of_its_peak():
    from trainer.synth.xrays import _noted

    opacity = np.zeros((10, 20))
    opacity[2:5, 4:9] = 1.0
    opacity[6, 15] = 0.05  # below a tenth of the peak: not part of the lesion
    drawn: list = []
    assert _noted(drawn, "consolidation", opacity) is opacity
    assert drawn == [{"kind": "consolidation", "box": [0.2, 0.2, 0.45, 0.5]}]
    _noted(None, "consolidation", opacity)  # nothing to record into: fine


def test_held_out_images_are_new_and_labelled(dataset, tmp_path):
    root, _ = dataset
    written = held_out_images(tmp_path / "inbox", 6, seed=3, size_range=SIZE_RANGE)
    assert [label for _, label in written] == ["NORMAL", "BACTERIA", "VIRUS"] * 2
    assert all(p.is_file() and p.name.startswith("synthetic-s3-") for p, _ in written)
    dataset_hashes = {hashlib.sha256(p.read_bytes()).digest() for p in root.rglob("*.jpeg")}
    assert not {hashlib.sha256(p.read_bytes()).digest() for p, _ in written} & dataset_hashes
    again = held_out_images(tmp_path / "again", 2, seed=3, size_range=SIZE_RANGE)
    assert again[0][0].read_bytes() == written[0][0].read_bytes()


def test_the_dicom_format_writes_the_same_drawings_every_way_a_pacs_stores_them(tmp_path):
    import pydicom

    from trainer.imaging.decode import decode_image
    from trainer.synth.dicom_writer import VARIANTS

    n = len(VARIANTS) + 2
    counts = generate_dataset(tmp_path / "dcm", n, seed=4, size_range=SIZE_RANGE, fmt="dicom")
    assert counts == generate_dataset(tmp_path / "jpg", n, seed=4, size_range=SIZE_RANGE)
    assert '"format": "dicom"' in (tmp_path / "dcm" / MARKER).read_text()
    dicoms = sorted((tmp_path / "dcm").rglob("*.dcm"))
    jpegs = sorted((tmp_path / "jpg").rglob("*.jpeg"))
    assert [p.relative_to(tmp_path / "dcm").with_suffix("") for p in dicoms] == [
        p.relative_to(tmp_path / "jpg").with_suffix("") for p in jpegs]
    seen = set()
    for dcm, jpeg in zip(dicoms, jpegs, strict=True):
        ds = pydicom.dcmread(dcm)
        seen.add((ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, ds.BitsStored))
        assert ds.PatientID == _parse(jpeg)[1] and str(ds.PatientName).startswith("SYNTHETIC")
        assert (ds.Modality, ds.BodyPartExamined) in {("DX", "CHEST"), ("CR", "CHEST")}
        difference = decode_image(dcm, 32, 10**7).astype(int) - decode_image(jpeg, 32, 10**7)
        assert np.abs(difference).mean() < 2.0, dcm.name
    assert {s for s, _, _ in seen} == {v.transfer_syntax for v in VARIANTS}
    assert {p for _, p, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {b for _, _, b in seen} >= {8, 10, 12, 16}
    with pytest.raises(DatasetError, match="unknown synthetic image format"):
        generate_dataset(tmp_path / "x", 6, fmt="tiff")


def test_cxr_synth_format_dicom_and_dicom_held_out_images(tmp_path, capsys):
    from worker.cli import main

    assert main(["synth", "--out", str(tmp_path / "data"), "--n", "6", "--format", "dicom"]) == 0
    assert "synthetic DICOM data set of 6 images" in capsys.readouterr().out
    assert len(list((tmp_path / "data").rglob("*.dcm"))) == 6
    assert not list((tmp_path / "data").rglob("*.jpeg"))
    written = held_out_images(tmp_path / "inbox", 3, seed=3, size_range=SIZE_RANGE, fmt="dicom")
    assert [p.name for p, _ in written] == [f"synthetic-s3-000{i}.dcm" for i in (1, 2, 3)]
