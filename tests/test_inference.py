"""The cascade and the task logic with tiny real Keras bundles, in process.

The tiny model answers by brightness (trainer.testing): bright -> PNEUMONIA / VIRUS,
dark -> NORMAL / BACTERIA, and ``bias`` shifts every probability.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_data import intake_file
from helpers_models import make_tiny_bundle, register_tiny_bundle, tiny_probability
from PIL import Image as PILImage

from db import claims, predictions, registry
from db.models import Image, Prediction
from db.session import session_scope
from db.vocabulary import ImageStatus, Label
from trainer.model.bundle import load_bundle
from trainer.model.cascade import positive_probability
from worker.classify.batch import process_images
from worker.classify.inference import ModelCache, StageModel, classify_arrays
from worker.settings import Settings


def _stage(models_dir, stage, model_id, bias=0.0, threshold=0.5, size=32) -> StageModel:
    directory = make_tiny_bundle(models_dir, stage, model_id, input_size=size,
                                 threshold=threshold, bias=bias)
    return StageModel(model_id, model_id, load_bundle(directory))


def _batch(*levels: int, size: int = 32) -> np.ndarray:
    return np.stack([np.full((size, size, 3), level, dtype=np.uint8) for level in levels])


def test_positive_probability_follows_class_order():
    p = np.array([0.2, 0.9])
    assert positive_probability(p, ["NORMAL", "PNEUMONIA"], "PNEUMONIA").tolist() == [0.2, 0.9]
    np.testing.assert_allclose(positive_probability(p, ["PNEUMONIA", "NORMAL"], "PNEUMONIA"),
                               [0.8, 0.1])
    with pytest.raises(ValueError):
        positive_probability(p, ["CAT", "DOG"], "PNEUMONIA")


def test_cascade_runs_stage_two_only_on_pneumonia(tmp_path):
    pneumonia = _stage(tmp_path, "pneumonia", 1)
    infection = _stage(tmp_path, "infection", 2, bias=4.0, size=40)  # other input size too
    calls, asked = [], []
    original = infection.bundle.predict_proba
    infection.bundle.predict_proba = lambda x: calls.append(len(x)) or original(x)
    levels = np.array([0, 255, 200, 10])

    def stage_two(indices, feed):
        asked.append((indices.tolist(), feed.size))
        return _batch(*levels[indices], size=feed.size)

    results = classify_arrays(_batch(*levels), pneumonia, infection, stage_two)
    assert [r.label for r in results] == [Label.NORMAL, Label.VIRUS, Label.VIRUS, Label.NORMAL]
    assert calls == [2] and asked == [([1, 2], 40)]
    assert results[0].p_virus is None and results[3].p_virus is None
    assert results[1].p_pneumonia == pytest.approx(tiny_probability(255), abs=1e-4)
    assert results[2].p_virus == pytest.approx(tiny_probability(200, bias=4.0), abs=1e-3)


def test_stage_two_at_another_size_needs_its_own_pixels(tmp_path):
    pneumonia = _stage(tmp_path, "pneumonia", 1)
    infection = _stage(tmp_path, "infection", 2, size=40)
    with pytest.raises(ValueError, match="stage 2 takes 40 px"):
        classify_arrays(_batch(255), pneumonia, infection)
    [dark] = classify_arrays(_batch(0), pneumonia, infection)  # no positive: stage 2 not asked
    assert dark.label == Label.NORMAL


def test_threshold_from_manifest_and_no_stage_two(tmp_path):
    strict = _stage(tmp_path, "pneumonia", 1, threshold=0.99)
    [mid, bright] = classify_arrays(_batch(180, 255), strict, None)
    assert mid.label == Label.NORMAL and mid.p_pneumonia > 0.5
    assert bright.label == Label.PNEUMONIA and bright.p_virus is None
    low_infection = _stage(tmp_path, "infection", 2, bias=-8.0)
    [r] = classify_arrays(_batch(255), strict, low_infection)
    assert r.label == Label.BACTERIA and r.p_virus < 0.5


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url, max_attempts=2)
    s.ensure_dirs()
    return s


def _drop(settings: Settings, name: str, level: int | None, size: int = 40,
          source=None) -> int:
    path = settings.inbox_dir / name
    if source is not None:
        path.write_bytes(source.read_bytes())
    elif level is None:
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    else:
        PILImage.new("L", (size, size), level).save(path)
    return intake_file(path, settings, lambda *_: None).image_id


def _row(settings: Settings, image_id: int) -> Image:
    with session_scope(settings.db_url) as session:
        row = session.get(Image, image_id)
        _ = row.prediction
        return row


def test_process_images_end_states(settings):
    cache = ModelCache(settings.models_path)
    waiting = _drop(settings, "w.png", 250)
    assert process_images([waiting], settings, cache) == {waiting: "waiting_model"}
    assert _row(settings, waiting).attempts == 0

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    bright, dark, bad = (_drop(settings, "b.png", 250), _drop(settings, "d.png", 5),
                         _drop(settings, "bad.jpeg", None))
    assert process_images([waiting], settings, cache) == {waiting: "done"}
    assert process_images([bright], settings, cache) == {bright: "done"}
    assert process_images([bright], settings, cache) == {}  # a redelivery does nothing
    assert process_images([dark], settings, cache) == {dark: "done"}
    assert process_images([bad], settings, cache) == {bad: "rejected"}

    assert _row(settings, bright).prediction.label == Label.PNEUMONIA
    assert _row(settings, bright).prediction.p_virus is None
    assert _row(settings, dark).prediction.label == Label.NORMAL
    rejected = _row(settings, bad)
    assert rejected.status == ImageStatus.REJECTED and rejected.error
    assert (settings.data_dir / rejected.stored_path).is_file()
    assert rejected.stored_path.startswith("rejected/")
    with session_scope(settings.db_url) as session:
        assert session.query(Prediction).count() == 2  # w.png and b.png differ in content


def _stripes(path, size: int = 64) -> None:
    """Sharp 3-pixel stripes, mean ~ 180: positive at stage 1, and blurred beyond recovery by
    any downscale-then-upscale."""
    pixels = np.where((np.arange(size) // 3) % 2 == 0, 255, 105).astype(np.uint8)
    PILImage.fromarray(np.tile(pixels, (size, 1))).save(path)


def test_stage_two_sees_the_pixels_training_gave_it(settings):
    """Stage 1 at 16 px, stage 2 at 48 px: stage 2 gets the file decoded at 48 px (what the
    trainer's pipeline feeds it), not the 16 px stage-1 pixels scaled up."""
    import keras

    from trainer.imaging.decode import decode_image

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", input_size=16)
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", input_size=48)
    seen = []

    def recording_loader(directory):
        bundle = load_bundle(directory)
        if bundle.manifest.stage == "infection":
            original = bundle.predict_proba
            bundle.predict_proba = lambda x: seen.append(np.array(x)) or original(x)
        return bundle

    source = settings.data_dir / "stripes.png"
    _stripes(source)
    image_id = _drop(settings, "stripes.png", None, source=source)
    cache = ModelCache(settings.models_path, loader=recording_loader)
    assert process_images([image_id], settings, cache) == {image_id: "done"}
    row = _row(settings, image_id)
    archived = settings.data_dir / row.stored_path
    trained = decode_image(archived, 48, settings.max_image_pixels).astype(np.float32)
    [given] = seen
    np.testing.assert_array_equal(given, trained[None])
    stage_one = decode_image(archived, 16, settings.max_image_pixels).astype(np.float32)
    rescaled = keras.ops.convert_to_numpy(
        keras.ops.image.resize(stage_one[None], (48, 48), antialias=True))
    assert np.abs(rescaled - trained).max() > 50  # the old path fed stage 2 other pixels
    infection = load_bundle(settings.models_path / "infection" / "v1")
    assert row.prediction.p_virus == pytest.approx(
        float(infection.predict_proba(trained[None])[0]), abs=1e-6)


def test_promotion_is_picked_up_without_a_new_cache(settings):
    cache = ModelCache(settings.models_path)
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", bias=-20.0)
    first = _drop(settings, "first.png", 200)
    assert process_images([first], settings, cache) == {first: "done"}
    assert _row(settings, first).prediction.label == Label.NORMAL
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", bias=20.0)
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", bias=20.0)
    second = _drop(settings, "second.png", 200)
    assert process_images([second], settings, cache) == {second: "done"}
    row = _row(settings, second)
    assert row.prediction.label == Label.VIRUS
    with session_scope(settings.db_url) as session:
        assert registry.get_production(session, "pneumonia").version == 2
        pred = session.get(Prediction, row.prediction_id)
        assert pred.pneumonia_model.version == 2 and pred.infection_model.version == 1


def test_a_delivery_past_max_attempts_fails_the_image(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    image_id = _drop(settings, "crashy.png", 100)
    for _ in range(settings.max_attempts):  # deliveries whose worker died mid-inference
        with session_scope(settings.db_url) as session:
            claims.claim(session, image_id, settings.max_attempts)
    outcome = process_images([image_id], settings, ModelCache(settings.models_path))
    assert outcome == {image_id: "failed"}
    row = _row(settings, image_id)
    assert row.status == ImageStatus.FAILED and "attempts" in row.error


def test_prediction_upsert_never_writes_twice(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    with session_scope(settings.db_url) as session:
        model_id = registry.get_production(session, "pneumonia").id
        kwargs = dict(sha256="f" * 64, pneumonia_model_id=model_id, infection_model_id=None,
                      p_pneumonia=0.7, p_virus=None, label="PNEUMONIA", threshold=0.5,
                      infection_threshold=None)
        [a] = predictions.save_predictions(session, [kwargs])
        [b, c] = predictions.save_predictions(session, [{**kwargs, "p_pneumonia": 0.1},
                                                   {**kwargs, "sha256": "e" * 64}])
        assert a == b != c and session.get(Prediction, b).p_pneumonia == 0.7
        assert session.query(Prediction).count() == 2


def test_cxr_classify_prints_labels_versions_and_disclaimer(settings, monkeypatch, capsys):
    from db.vocabulary import DISCLAIMER
    from worker.cli import main

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", bias=-20.0,
                         input_size=24)  # stage 2 decodes the file again at its own size
    bright, broken = settings.data_dir / "bright.png", settings.data_dir / "broken.png"
    PILImage.new("L", (40, 40), 250).save(bright)
    broken.write_bytes(b"not an image")
    monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", settings.db_url)
    assert main(["classify", str(bright), str(broken)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "models: pneumonia/v1 infection/v1"
    assert out[1].startswith(f"{bright}\tBACTERIA\tp_pneumonia=0.99")
    assert out[2].startswith(f"{broken}\trejected: ")
    assert out[-1] == DISCLAIMER
    with session_scope(settings.db_url) as session:
        assert session.query(Image).count() == 0  # classify records nothing


def test_dicom_identifiers_are_stored_for_done_and_rejected_images(settings):
    """Identifiers reach the images row and the results view, for a rejected lateral too; the
    same content twice is one prediction."""
    from helpers_dicom import UIDS, make_ds, texture, to_bytes

    from db.results import list_results

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    frontal = to_bytes(make_ds(texture(12), bits_stored=12))
    lateral = to_bytes(make_ds(texture(12), bits_stored=12, ViewPosition="LL",
                               AccessionNumber="ACC-LAT"))
    ids = {}
    for name, data in (("a.dcm", frontal), ("1.2.3.4", frontal), ("lat.dcm", lateral)):
        (settings.inbox_dir / name).write_bytes(data)
        ids[name] = intake_file(settings.inbox_dir / name, settings, lambda *_: None).image_id
    cache = ModelCache(settings.models_path)
    outcome = process_images(ids.values(), settings, cache)
    assert [outcome[ids[n]] for n in ids] == ["done", "done", "rejected"]
    with session_scope(settings.db_url) as session:
        rows = {r["file_name"]: r for r in list_results(session)}
        assert session.query(Prediction).count() == 1
    for name in ("a.dcm", "1.2.3.4"):
        assert rows[name]["status"] == "done"
        assert (rows[name]["study_instance_uid"], rows[name]["sop_instance_uid"]) == (
            UIDS["StudyInstanceUID"], UIDS["SOPInstanceUID"])
        assert (rows[name]["accession_number"], rows[name]["modality"],
                rows[name]["view_position"]) == ("ACC-0042", "CR", "PA")
    assert rows["lat.dcm"]["status"] == "rejected"
    assert rows["lat.dcm"]["error"].startswith("lateral view (ViewPosition LL)")
    assert (rows["lat.dcm"]["accession_number"], rows["lat.dcm"]["view_position"]) == (
        "ACC-LAT", "LL")


def test_cxr_classify_takes_dicom(settings, monkeypatch, capsys):
    from helpers_dicom import make_ds, texture

    from worker.cli import main

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    bright = settings.data_dir / "bright"  # no extension, as PACS exports often are
    make_ds(texture(8) // 4 + 190, WindowCenter=128, WindowWidth=256).save_as(
        bright, enforce_file_format=True)
    monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", settings.db_url)
    assert main(["classify", str(bright)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"{bright}\tPNEUMONIA\t")
