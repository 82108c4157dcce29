"""Shadow versions and re-scores in the worker's own code, in process (SQLite and PostgreSQL,
tiny real bundles): what happens when a shadow cannot run or a past file is gone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers_data import intake_file
from helpers_models import register_tiny_bundle
from PIL import Image as PILImage
from sqlalchemy import text

from db import registry
from db import rescore_jobs as jobs
from db.session import session_scope
from worker.classify.batch import process_images
from worker.classify.inference import ModelCache
from worker.classify.rescoring import rescore_images
from worker.classify.shadow import run_shadows
from worker.settings import Settings


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", database_url=db_url)
    s.ensure_dirs()
    return s


def _drop(settings: Settings, name: str, level: int) -> int:
    path = settings.inbox_dir / name
    PILImage.new("L", (40, 40), level).save(path)
    return intake_file(path, settings, lambda *_: None).image_id


def _shadow(settings: Settings, stage: str, version: int) -> None:
    with session_scope(settings.db_url) as session:
        registry.set_shadow(session, stage, version)


def _count(settings: Settings, sql: str) -> int:
    with session_scope(settings.db_url) as session:
        return int(session.execute(text(sql)).scalar_one())


def test_a_shadow_whose_bundle_was_tampered_with_never_stops_production(settings, caplog):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", promote=False)
    _shadow(settings, "pneumonia", 2)
    (settings.models_path / "pneumonia" / "v2" / "model.keras").write_bytes(b"not a model")
    ids = [_drop(settings, f"{n}.png", 40 * n) for n in range(1, 4)]
    cache = ModelCache(settings.models_path)
    with caplog.at_level(logging.WARNING, logger="worker.classify.inference"):
        assert process_images(ids, settings, cache) == dict.fromkeys(ids, "done")
        more = _drop(settings, "4.png", 200)
        assert process_images([more], settings, cache) == {more: "done"}
    assert caplog.text.count("shadow model pneumonia/v2 not loaded") == 1  # once, not per batch
    assert _count(settings, "SELECT COUNT(*) FROM image_predictions WHERE role = 'shadow'") == 0
    assert _count(settings, "SELECT COUNT(*) FROM image_predictions "
                            "WHERE role = 'production'") == 4


def test_a_shadow_that_fails_while_running_leaves_production_done(settings, caplog,
                                                                 monkeypatch):
    """A shadow that raises in the forward pass (a broken layer, an out-of-memory) costs its
    own answers only: every image still gets production's."""
    import worker.classify.batch as batch

    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", promote=False)
    _shadow(settings, "pneumonia", 2)

    def broken(*args, **kwargs):
        raise RuntimeError("the shadow's forward pass failed")

    monkeypatch.setattr(batch, "run_shadows", broken)
    ids = [_drop(settings, f"{n}.png", 40 * n) for n in range(1, 4)]
    with caplog.at_level(logging.ERROR, logger="worker.classify.batch"):
        assert process_images(ids, settings, ModelCache(settings.models_path)) == dict.fromkeys(
            ids, "done")
    assert "a shadow version failed on this batch" in caplog.text
    assert _count(settings, "SELECT COUNT(*) FROM image_predictions WHERE role = 'shadow'") == 0


def test_a_shadow_with_another_input_size_is_skipped_not_fed_resized_pixels(settings, caplog,
                                                                             monkeypatch):
    import worker.classify.shadow

    monkeypatch.setattr(worker.classify.shadow, "_warned", set())  # warned once per process
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", promote=False,
                         input_size=48)
    _shadow(settings, "pneumonia", 2)
    with session_scope(settings.db_url) as session:
        models = ModelCache(settings.models_path).current(session)
    assert models.shadow_pneumonia is not None and models.shadow_pneumonia.input_size == 48
    pixels = np.full((2, 32, 32, 3), 200.0, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="worker.classify.shadow"):
        assert run_shadows(pixels, models, [], lambda *_: None) == []
    assert "takes 48 px images" in caplog.text


def test_rescore_relinks_reuses_and_keeps_the_answer_of_a_file_gone_since(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    ids = [_drop(settings, f"{n}.png", 50 * n) for n in range(1, 5)]
    cache = ModelCache(settings.models_path)
    process_images(ids, settings, cache)
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", bias=2.0)  # v2
    with session_scope(settings.db_url) as session:
        gone = session.execute(text("SELECT stored_path FROM images WHERE id = :i"),
                               {"i": ids[0]}).scalar_one()
        job, resumed = jobs.start_or_resume(session, {}, registry.production_ids(session)[
            "pneumonia"], None)
    (settings.data_dir / gone).unlink()
    assert not resumed and job.total == 4
    assert rescore_images(ids, job.id, settings, cache) == {"reused": 0, "classified": 3,
                                                            "skipped": 1}
    assert rescore_images(ids, job.id, settings, cache) == {"reused": 0}  # idempotent
    with session_scope(settings.db_url) as session:
        job = jobs.get_job(session, job.id)
        assert jobs.pending_ids(session, job) == []
        shown = dict(session.execute(text(
            "SELECT i.id, m.version FROM images i JOIN predictions p ON p.id = i.prediction_id "
            "JOIN model_versions m ON m.id = p.pneumonia_model_id")).all())
    assert job.skipped == {str(ids[0]): "its archived file is missing"}
    assert shown == {ids[0]: 1, **dict.fromkeys(ids[1:], 2)}
    assert _count(settings, "SELECT COUNT(*) FROM predictions") == 4 + 3


def test_a_copy_answered_at_intake_has_its_prediction_in_its_history(settings):
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia")
    first = _drop(settings, "a.png", 200)
    process_images([first], settings, ModelCache(settings.models_path))
    copy = _drop(settings, "b.png", 200)  # same bytes: linked at intake, never classified
    from db.prediction_roles import image_history

    with session_scope(settings.db_url) as session:
        history = image_history(session, copy)
        shown = session.execute(text("SELECT prediction_id FROM images WHERE id = :i"),
                                {"i": first}).scalar_one()
    assert [(h.role, h.pneumonia_model, h.shown) for h in history] == [("production", 1, True)]
    assert _count(settings, f"SELECT prediction_id FROM images WHERE id = {copy}") == shown
