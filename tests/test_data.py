"""Dataset scanning, patient-grouped splits, stage views, fingerprints and the tf.data pipeline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db.exceptions import DatasetError
from db.vocabulary import CASCADE_CLASSES
from trainer.training import data


def _jpeg(path: Path, value: int = 128, size: int = 40, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size + 4), value if mode == "L" else (value,) * 3).save(path)


def make_kaggle(root: Path, *, patients: int = 12, per_patient: int = 3, test_patients: int = 3,
                with_val: bool = True) -> Path:
    """A tiny Kaggle-layout folder; every patient has several images, ids never shared."""
    pid = 0
    for split, n in (("train", patients), ("test", test_patients)):
        for _ in range(n):
            pid += 1
            for k in range(per_patient):
                _jpeg(root / split / "NORMAL" / f"IM-{pid:04d}-{k + 1:04d}.jpeg", 60 + k)
                _jpeg(root / split / "NORMAL" / f"NORMAL2-IM-{pid:04d}-{k + 1:04d}.jpeg", 70)
                _jpeg(root / split / "PNEUMONIA" / f"person{pid}_bacteria_{pid * 10 + k}.jpeg",
                      200)
                if pid % 2:
                    _jpeg(root / split / "PNEUMONIA" / f"person{pid + 1000}_virus_{k}.jpeg", 150)
    if with_val:
        pid += 1
        _jpeg(root / "val" / "NORMAL" / f"IM-{pid:04d}-0001.jpeg")
        _jpeg(root / "val" / "PNEUMONIA" / f"person{pid}_bacteria_1.jpeg")
    return root


def test_parse_name():
    assert data.parse_name("person1946_bacteria_4874.jpeg", "PNEUMONIA") == (
        "BACTERIA",
        "person1946",
    )
    assert data.parse_name("person1_virus_6.jpeg", "PNEUMONIA") == ("VIRUS", "person1")
    assert data.parse_name("IM-0115-0001.jpeg", "NORMAL") == ("NORMAL", "IM-0115")
    assert data.parse_name("NORMAL2-IM-1427-0001.jpeg", "NORMAL") == ("NORMAL", "NORMAL2-IM-1427")
    with pytest.raises(DatasetError, match="unknown file name"):
        data.parse_name("scan_01.jpeg", "PNEUMONIA")
    with pytest.raises(DatasetError, match="unknown file name"):
        data.parse_name("person3_virus_1.jpeg", "NORMAL")


def test_scan_reads_layout_labels_and_patients(tmp_path):
    root = make_kaggle(tmp_path / "d")
    (root / "train" / "NORMAL" / ".DS_Store").write_text("x")
    records = data.scan_dataset(root)
    counts = Counter((r.split, r.label3) for r in records)
    assert counts[("train", "NORMAL")] == 12 * 3 * 2
    assert counts[("train", "BACTERIA")] == 36
    assert counts[("train", "VIRUS")] == 18
    assert counts[("val", "NORMAL")] == 1
    assert len({r.patient for r in records if r.label3 == "NORMAL"}) == 2 * (12 + 3) + 1


def test_scan_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.scan_dataset(tmp_path / "nope")
    (tmp_path / "a" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DatasetError, match="missing train/PNEUMONIA"):
        data.scan_dataset(tmp_path / "a")
    root = make_kaggle(tmp_path / "b", with_val=False)
    assert data.scan_dataset(root)  # val/ is optional
    _jpeg(root / "train" / "PNEUMONIA" / "person1_fungus_1.jpeg")
    with pytest.raises(DatasetError, match="person1_fungus_1.jpeg"):
        data.scan_dataset(root)
    (root / "train" / "PNEUMONIA" / "person1_fungus_1.jpeg").unlink()
    (root / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="missing test/"):
        data.scan_dataset(root)


def test_empty_class_is_a_clear_error(tmp_path):
    root = make_kaggle(tmp_path / "d")
    for p in root.glob("test/PNEUMONIA/*virus*"):
        p.unlink()
    with pytest.raises(DatasetError, match="test has no VIRUS"):
        data.split_records(data.scan_dataset(root))


@pytest.mark.parametrize("seed", range(8))
def test_no_patient_in_two_splits_and_stratified(tmp_path_factory, seed):
    root = _shared_root(tmp_path_factory)
    records = data.scan_dataset(root)
    splits = data.split_records(records, val_fraction=0.25, seed=seed)
    groups = {name: {r.patient for r in getattr(splits, name)} for name in ("train", "val", "test")}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(records)
    assert all(r.split == "test" for r in splits.test)
    for label in CASCADE_CLASSES:
        pool = sum(r.label3 == label for r in records if r.split != "test")
        in_val = sum(r.label3 == label for r in splits.val)
        assert 0 < in_val < pool, label
        assert abs(in_val / pool - 0.25) < 0.15, label


def test_split_depends_on_seed_and_drops_test_patients(tmp_path):
    root = make_kaggle(tmp_path / "d")
    _jpeg(root / "train" / "PNEUMONIA" / "person13_bacteria_999.jpeg")  # person13 is in test
    records = data.scan_dataset(root)
    a = data.split_records(records, seed=1)
    assert a == data.split_records(records, seed=1)
    b = data.split_records(records, seed=2)
    assert {r.patient for r in a.val} != {r.patient for r in b.val}
    assert "person13" not in {r.patient for r in a.train + a.val}
    with pytest.raises(DatasetError, match="val fraction"):
        data.split_records(records, val_fraction=1.5)


_ROOT: list[Path] = []


def _shared_root(factory) -> Path:
    if not _ROOT:
        _ROOT.append(make_kaggle(factory.mktemp("kaggle"), patients=30, per_patient=2))
    return _ROOT[0]


def test_stage_views_and_class_weights(tmp_path):
    records = data.scan_dataset(make_kaggle(tmp_path / "d"))
    train = [r for r in records if r.split == "train"]
    paths, y = data.stage_view(train, "pneumonia")
    assert len(paths) == len(train) and Counter(y) == {0: 72, 1: 54}
    paths, y = data.stage_view(train, "infection")
    assert Counter(y) == {0: 36, 1: 18}
    assert all("NORMAL" not in str(p) for p in paths)
    w = data.class_weights(y)
    assert w[1] / w[0] == pytest.approx(2.0)
    assert 36 * w[0] + 18 * w[1] == pytest.approx(54)
    with pytest.raises(DatasetError):
        data.stage_view(train, "fracture")
    with pytest.raises(DatasetError):
        data.class_weights([1, 1])


def test_fingerprint_changes_with_content_and_names(tmp_path):
    root = make_kaggle(tmp_path / "d", patients=2, test_patients=1)
    records = data.scan_dataset(root)
    first = data.dataset_fingerprint(records, root)
    assert first == data.dataset_fingerprint(list(reversed(records)), root)
    _jpeg(records[0].path, value=3)
    second = data.dataset_fingerprint(records, root)
    assert second != first
    moved = root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    records[0].path.rename(moved)
    assert data.dataset_fingerprint(data.scan_dataset(root), root) not in (first, second)


def test_pipeline_decodes_grey_and_rgb_to_raw_pixels(tmp_path):
    from helpers_models import load_images

    from trainer.training.dataset import make_dataset

    grey, rgb = tmp_path / "g.png", tmp_path / "c.jpeg"
    _jpeg(grey, 200, size=40)
    _jpeg(rgb, 50, size=40, mode="RGB")
    images = load_images([grey, rgb], 16)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    assert np.allclose(images[0], 200, atol=1)
    assert abs(images[1].mean() - 50) < 3

    ds = make_dataset([grey, rgb] * 4, [1, 0] * 4, 16, 3, training=True, seed=1)
    batches = list(ds)
    assert [int(x.shape[0]) for x, _ in batches] == [3, 3, 2]
    x, y = batches[0]
    assert x.shape[1:] == (16, 16, 3) and y.shape[1:] == (1,)
    assert float(np.min(x)) >= 0.0 and float(np.max(x)) <= 255.0
    assert float(np.max(x)) > 1.5  # raw 0-255 pixels, not rescaled
    labels = sorted(float(v) for _, yb in batches for v in np.ravel(yb))
    assert labels == [0.0] * 4 + [1.0] * 4


def test_pipeline_names_an_undecodable_training_file(tmp_path):
    from helpers_models import load_images

    bad = tmp_path / "person1_virus_1.jpeg"
    bad.write_text("<html>not an x-ray</html>")
    with pytest.raises(Exception, match=r"person1_virus_1\.jpeg: not an image"):
        load_images([bad], 16)


def test_dicom_files_in_the_kaggle_layout_go_through_the_same_decoder(tmp_path):
    """The trainer takes .dcm files beside (or instead of) JPEGs: scanned, labelled by name,
    decoded by the service's own decoder in the tf.data pipeline."""
    from helpers_models import load_images

    from trainer.imaging.decode import decode_image
    from trainer.synth.xrays import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, 12, seed=2, size_range=(40, 48), fmt="dicom")
    records = data.scan_dataset(root)
    assert len(records) == 12 and {r.path.suffix for r in records} == {".dcm"}
    assert {r.label3 for r in records} == set(CASCADE_CLASSES)
    paths = [r.path for r in records]
    images = load_images(paths, 24)
    expected = np.stack([decode_image(p, 24, 10**7) for p in paths]).astype(np.float32)
    np.testing.assert_array_equal(images, expected)
