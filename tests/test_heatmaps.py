"""Heatmaps in the service (worker.classify.heatmaps): written by the batch with CXR_HEATMAPS for
every pneumonia-positive result, per prediction, from the deciding stage's own pixels; named in the
``results`` view; `cxr explain` for results and files. Tiny real bundles whose 1x1 convolution
makes the heatmap of the positive class the image's brightness.
"""

from __future__ import annotations

import logging
import stat

import numpy as np
import pytest
from helpers_data import intake_file
from helpers_models import register_tiny_bundle
from PIL import Image as PILImage

from db.results import list_results
from db.session import session_scope
from db.vocabulary import DISCLAIMER, Label, Stage
from worker.classify.batch import process_images
from worker.classify.heatmaps import deciding_stage, explain_results
from worker.classify.inference import CascadeResult, ModelCache
from worker.settings import Settings


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url, heatmaps=True)
    s.ensure_dirs()
    return s


def _image(path, level: int, spot: tuple[int, int] | None = None, size: int = 40) -> None:
    """A flat grey image, with a white 8 px square at ``spot`` (x, y) when given."""
    pixels = np.full((size, size), level, dtype=np.uint8)
    if spot is not None:
        x, y = spot
        pixels[y:y + 8, x:x + 8] = 255
    PILImage.fromarray(pixels).save(path)


def _drop(settings: Settings, name: str, level: int | None, spot=None) -> int:
    path = settings.inbox_dir / name
    if level is None:
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    else:
        _image(path, level, spot)
    return intake_file(path, settings, lambda *_: None).image_id


def _results(settings: Settings) -> dict[str, dict]:
    with session_scope(settings.db_url) as session:
        return {r["file_name"]: r for r in list_results(session)}


def test_the_deciding_stage():
    assert deciding_stage(Label.NORMAL) == deciding_stage(Label.PNEUMONIA) == Stage.PNEUMONIA
    assert deciding_stage(Label.BACTERIA) == deciding_stage(Label.VIRUS) == Stage.INFECTION


def test_workers_write_a_heatmap_for_every_positive_result(settings):
    """Stage 2 (24 px) decides VIRUS for a dim image with a white square (bias 3: positive
    from a mean of 64): its heatmap is drawn at 24 px and is hot on the square only."""
    for stage, size in (("pneumonia", 32), ("infection", 24)):
        register_tiny_bundle(settings.db_url, settings.models_path, stage, conv=True,
                             input_size=size, bias=3.0)
    ids = [_drop(settings, "bright.png", 80, spot=(4, 28)), _drop(settings, "dark.png", 20),
           _drop(settings, "bad.jpeg", None)]
    outcome = process_images(ids, settings, ModelCache(settings.models_path))
    assert outcome == dict(zip(ids, ["done", "done", "rejected"], strict=True))
    rows = _results(settings)
    bright, dark = rows["bright.png"], rows["dark.png"]
    assert bright["label"] == Label.VIRUS and dark["label"] == Label.NORMAL
    assert dark["heatmap_path"] is None and rows["bad.jpeg"]["heatmap_path"] is None
    relpath = bright["heatmap_path"]
    assert relpath == f"heatmaps/{bright['sha256'][:2]}/{bright['sha256']}-p1-i2.png"
    path = settings.data_dir / relpath
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(settings.heatmaps_dir.stat().st_mode) == 0o700
    side = 24 * 11  # stage 2's pixels, enlarged to 256 px or more by whole pixels
    with PILImage.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 2 * side
        rgb = np.asarray(picture.convert("RGB"), dtype=np.int16)
    overlay = rgb[:side, side:2 * side]
    spot = overlay[int(0.85 * side), int(0.25 * side)]  # inside the white square
    corner = overlay[int(0.1 * side), int(0.9 * side)]
    assert spot[0] - spot[2] > 40  # hot: red over white
    assert abs(corner - rgb[int(0.1 * side), int(0.9 * side)]).max() <= 2  # plain where dim
    assert list(settings.heatmaps_dir.rglob("*.png")) == [path]


def test_each_stage_is_explained_on_its_own_pixels(settings):
    from trainer.model.bundle import load_bundle
    from worker.classify.inference import Models, StageModel

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", conv=True)
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", conv=True,
                         input_size=24)
    stage1 = StageModel(1, 1, load_bundle(settings.models_path / "pneumonia" / "v1"))
    stage2 = StageModel(2, 1, load_bundle(settings.models_path / "infection" / "v1"))
    pixels = np.full((3, 32, 32, 3), 200, dtype=np.uint8)
    asked = []

    def stage_two(indices, feed):
        asked.append((indices.tolist(), feed.size))
        return np.full((len(indices), feed.size, feed.size, 3), 90, dtype=np.uint8)

    results = [CascadeResult(Label.VIRUS, 0.9, 0.8), CascadeResult(Label.PNEUMONIA, 0.9, None),
               CascadeResult(Label.BACTERIA, 0.9, 0.1)]
    heatmaps = explain_results(Models(stage1, stage2), results, pixels, stage_two)
    assert asked == [([0, 2], 24)]
    assert [heatmaps[i].stage for i in range(3)] == [Stage.INFECTION, Stage.PNEUMONIA,
                                                     Stage.INFECTION]
    assert heatmaps[0].pixels.shape == (24, 24, 3) and heatmaps[0].cam.shape == (24, 24)
    assert heatmaps[1].pixels.shape == (32, 32, 3) and heatmaps[1].layer == "brightness"
    assert heatmaps[0].cam.min() > 0.99 and not heatmaps[2].cam.any()  # flat image: flat map


def test_no_feature_map_no_heatmap_and_the_batch_goes_on(settings, caplog):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")  # no convolution
    ids = [_drop(settings, "one.png", 220), _drop(settings, "two.png", 230)]
    cache = ModelCache(settings.models_path)
    with caplog.at_level(logging.WARNING, logger="worker.classify.heatmaps"):
        assert process_images(ids[:1], settings, cache) == {ids[0]: "done"}
        assert process_images(ids[1:], settings, cache) == {ids[1]: "done"}
    rows = _results(settings)
    assert [rows[n]["label"] for n in ("one.png", "two.png")] == [Label.PNEUMONIA] * 2
    assert all(r["heatmap_path"] is None for r in rows.values())
    warnings = [r.getMessage() for r in caplog.records if "no heatmaps" in r.getMessage()]
    assert len(warnings) == 1 and "no convolutional layer" in warnings[0]


def test_heatmaps_are_off_by_default(tmp_path, db_url):
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    settings.ensure_dirs()
    assert settings.heatmaps is False
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", conv=True)
    image_id = _drop(settings, "bright.png", 250)
    assert process_images([image_id], settings, ModelCache(settings.models_path)) == {
        image_id: "done"}
    assert _results(settings)["bright.png"]["heatmap_path"] is None
    assert not settings.heatmaps_dir.exists()


def test_cxr_explain_for_results_and_files(settings, monkeypatch, capsys, tmp_path):
    """Results are explained with the versions that made them, even after a promotion."""
    from worker.cli import main

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", conv=True)
    ids = [_drop(settings, "bright.png", 200, spot=(20, 4)), _drop(settings, "bad.jpeg", None)]
    process_images(ids, settings.model_copy(update={"heatmaps": False}),
                   ModelCache(settings.models_path))
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", bias=-30.0,
                         conv=True)
    monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", settings.db_url)
    out = tmp_path / "pictures"
    bright, bad = ids
    assert main(["explain", str(bright), str(bad), "999", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    target = out / f"image-{bright}-heatmap.png"
    assert lines[0] == f"image {bright}: PNEUMONIA -> {target}"
    assert lines[1].startswith(f"image {bad}: not classified (rejected: ")
    assert lines[2] == "image 999: no such image"
    assert lines[-1] == DISCLAIMER
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with PILImage.open(target) as picture:
        assert picture.format == "PNG"

    dropped = tmp_path / "mine.png"
    _image(dropped, 230)
    assert main(["explain", "--file", str(dropped), "--out", str(out)]) == 0
    # the production model now (bias -30) calls it NORMAL: explained as NORMAL, by stage 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{dropped}: NORMAL -> {out / 'mine-heatmap.png'}")
    assert (out / "mine-heatmap.png").is_file()


def test_cxr_explain_needs_something_to_explain(settings, monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
    assert main(["explain"]) == 2
    assert "IMAGE_ID" in capsys.readouterr().err
