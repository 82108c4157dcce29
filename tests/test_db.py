"""Schema, registry and results view, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from db import registry
from db.exceptions import CxrError, ModelNotFoundError, SchemaBehindError
from db.migrate import check_schema, current_revision, downgrade, head_revision, upgrade
from db.models import Image, ModelVersion, Prediction
from db.results import RESULT_COLUMNS, list_results
from db.session import get_engine, session_scope
from db.vocabulary import ImageStatus, ModelStatus


def test_migrations_build_exactly_the_models(db_url):
    """A column added to db/models.py without a migration (or the reverse) fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base

    with get_engine(db_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_the_claims_migration_steps_down_and_up_with_the_results_view(empty_db_url):
    upgrade(empty_db_url)
    downgrade(empty_db_url, "0001")
    columns = {c["name"] for c in inspect(get_engine(empty_db_url)).get_columns("images")}
    assert "claimed_by" not in columns
    with get_engine(empty_db_url).connect() as conn:
        conn.execute(text("SELECT * FROM results")).all()
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()


def test_the_task_and_dicom_migrations_step_down_and_up_with_the_results_view(empty_db_url):
    from db.identifiers import DICOM_KEYWORDS

    def view_columns() -> set[str]:
        with get_engine(empty_db_url).connect() as conn:
            return set(conn.execute(text("SELECT * FROM results")).keys())

    upgrade(empty_db_url)
    assert set(DICOM_KEYWORDS) <= view_columns()
    downgrade(empty_db_url, "0003")
    columns = {c["name"] for c in inspect(get_engine(empty_db_url)).get_columns("images")}
    assert not set(DICOM_KEYWORDS) & (columns | view_columns())
    assert "task_id" in columns and "task_id" in view_columns()
    downgrade(empty_db_url, "0002")
    columns = {c["name"] for c in inspect(get_engine(empty_db_url)).get_columns("images")}
    assert "claimed_by" in columns and "task_id" not in columns | view_columns()
    upgrade(empty_db_url)
    assert set(DICOM_KEYWORDS) <= view_columns()


def test_the_heatmaps_migration_steps_down_and_up_with_the_results_view(empty_db_url):
    upgrade(empty_db_url)
    downgrade(empty_db_url, "0004")

    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspect(get_engine(empty_db_url)).get_columns(table)}

    assert "heatmap_path" not in columns("predictions") | columns("results")
    assert {"task_id", "modality"} <= columns("results")
    upgrade(empty_db_url)
    assert "heatmap_path" in columns("predictions") & columns("results")


def _register(url: str, stage: str = "pneumonia", **kw) -> int:
    with session_scope(url) as s:
        return registry.register_version(s, stage=stage, backbone="smallcnn", **kw).version


def _production(url: str, stage: str) -> int | None:
    with session_scope(url) as s:
        row = registry.get_production(s, stage)
        return row.version if row else None


def test_migrations_upgrade_from_empty_and_back_down(empty_db_url):
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    names = set(inspect(get_engine(empty_db_url)).get_table_names())
    assert {"images", "model_versions", "predictions"} <= names
    assert "results" in inspect(get_engine(empty_db_url)).get_view_names()
    downgrade(empty_db_url, "base")
    inspector = inspect(get_engine(empty_db_url))
    assert not {"images", "model_versions", "predictions"} & set(inspector.get_table_names())
    assert "results" not in inspector.get_view_names()
    upgrade(empty_db_url)
    check_schema(empty_db_url)


def test_schema_check_refuses_an_old_database_and_names_the_fix(empty_db_url):
    with pytest.raises(SchemaBehindError, match="cxr db upgrade"):
        check_schema(empty_db_url)
    upgrade(empty_db_url)
    with get_engine(empty_db_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaBehindError, match="at schema 0000.*Run: cxr db upgrade"):
        check_schema(empty_db_url)


def test_versions_are_numbered_per_stage_with_relative_bundle_paths(db_url):
    assert [_register(db_url) for _ in range(3)] == [1, 2, 3]
    assert _register(db_url, "infection") == 1
    with session_scope(db_url) as s:
        v2 = registry.get_version(s, "pneumonia", 2)
        assert v2.bundle_path == "pneumonia/v2"
        assert v2.status == ModelStatus.CANDIDATE
        with pytest.raises(ModelNotFoundError, match="pneumonia/v9"):
            registry.get_version(s, "pneumonia", 9)
        with pytest.raises(CxrError, match="unknown stage"):
            registry.list_versions(s, "lungs")


def test_register_keeps_metrics_params_and_lineage(db_url):
    metrics = {"test": {"auc": 0.97, "accuracy": 0.91}}
    params = {"epochs": 3, "img_size": 64}
    _register(db_url, metrics=metrics, params=params, dataset_fingerprint="ab" * 32)
    _register(db_url, parent_version=1, code_version="abc123")
    with session_scope(db_url) as s:
        v1, v2 = registry.list_versions(s, "pneumonia")
        assert v1.metrics == metrics and v1.params == params
        assert v1.dataset_fingerprint == "ab" * 32
        assert v2.parent_version == 1 and v2.code_version == "abc123"


def test_promote_keeps_one_production_and_rollback_walks_back(db_url):
    for _ in range(3):
        _register(db_url)
    for version in (1, 2, 3):
        with session_scope(db_url) as s:
            registry.promote(s, "pneumonia", version)
        with session_scope(db_url) as s:
            statuses = {m.version: m.status for m in registry.list_versions(s)}
        assert [v for v, st in statuses.items() if st == ModelStatus.PRODUCTION] == [version]
    with session_scope(db_url) as s:
        assert registry.rollback(s, "pneumonia").version == 2
    with session_scope(db_url) as s:
        assert registry.rollback(s, "pneumonia").version == 1
    with session_scope(db_url) as s, pytest.raises(ModelNotFoundError, match="nothing to roll"):
        registry.rollback(s, "pneumonia")
    assert _production(db_url, "pneumonia") == 1
    with session_scope(db_url) as s, pytest.raises(ModelNotFoundError, match="no production"):
        registry.rollback(s, "infection")


def test_database_itself_refuses_two_production_versions(db_url):
    _register(db_url)
    _register(db_url)
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.execute(
            ModelVersion.__table__.update()
            .where(ModelVersion.stage == "pneumonia")
            .values(status=ModelStatus.PRODUCTION)
        )


def test_prediction_unique_per_content_and_model_pair(db_url):
    _register(db_url)
    with session_scope(db_url) as s:
        model_id = registry.get_version(s, "pneumonia", 1).id
    row = dict(sha256="f" * 64, pneumonia_model_id=model_id, p_pneumonia=0.2, label="NORMAL")
    with session_scope(db_url) as s:
        s.add(Prediction(**row, threshold=0.5))
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(Prediction(**row, threshold=0.5))


def test_results_view_has_the_documented_columns_and_one_row_per_file(db_url):
    _register(db_url)
    with session_scope(db_url) as s:
        model = registry.promote(s, "pneumonia", 1)
        pred = Prediction(
            sha256="a" * 64,
            pneumonia_model_id=model.id,
            p_pneumonia=0.9,
            label="PNEUMONIA",
            threshold=0.5,
        )
        s.add(pred)
        s.flush()
        for name in ("one.jpeg", "copy of one.jpeg"):
            s.add(
                Image(
                    sha256="a" * 64, file_name=name, status=ImageStatus.DONE, prediction_id=pred.id
                )
            )
        s.add(
            Image(
                sha256="b" * 64,
                file_name="bad.jpg",
                status=ImageStatus.REJECTED,
                error="truncated JPEG",
            )
        )
    with session_scope(db_url) as s:
        rows = list_results(s)
        assert len(rows) == 3
        assert set(RESULT_COLUMNS) <= set(rows[0])
        by_name = {r["file_name"]: r for r in rows}
        assert by_name["one.jpeg"]["label"] == "PNEUMONIA"
        assert by_name["one.jpeg"]["pneumonia_model"] == 1
        assert by_name["one.jpeg"]["infection_model"] is None
        assert by_name["bad.jpg"]["error"] == "truncated JPEG"
        assert [r["file_name"] for r in list_results(s, status="rejected")] == ["bad.jpg"]
        assert len(list_results(s, label="pneumonia", limit=1)) == 1
        received = s.scalar(select(Image.received_at).limit(1))
        assert len(list_results(s, since=received.replace(year=received.year - 1))) == 3
        assert list_results(s, since=received.replace(year=received.year + 1)) == []


def _race(url: str, stage: str, rounds: int, queue) -> None:
    from db.session import dispose_engines

    dispose_engines()
    made = []
    try:
        for _ in range(rounds):

            def register_and_promote() -> int:
                with session_scope(url) as s:
                    version = registry.register_version(s, stage=stage, backbone="x").version
                with session_scope(url) as s:
                    registry.promote(s, stage, version)
                return version

            made.append(registry.with_retries(register_and_promote, attempts=30))
        queue.put(("ok", made))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put(("error", repr(exc)))


def test_concurrent_register_and_promote_from_several_processes(db_url):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(db_url, stage, 5, queue))
        for stage in ("pneumonia", "pneumonia", "pneumonia", "infection", "infection")
    ]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    with session_scope(db_url) as s:
        rows = registry.list_versions(s)
    for stage, expected in (("pneumonia", 15), ("infection", 10)):
        versions = sorted(m.version for m in rows if m.stage == stage)
        assert versions == list(range(1, expected + 1))
        production = [m for m in rows if m.stage == stage and m.status == ModelStatus.PRODUCTION]
        assert len(production) == 1
