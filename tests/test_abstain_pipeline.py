"""Knowing when not to answer, through the real stack (issue 22): a small CNN trained on
synthetic films with its input gate and calibration in the bundle, served by a real watcher and
Celery worker (private Redis, SQLite), and imported with ``cxr models import --reference``.

Also the database side on SQLite and PostgreSQL: the ``results`` view's ``gate_score`` and
``review`` columns and ``cxr results --review``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from helpers_abstain import SIZE, decoded, train_gated_model
from helpers_models import limit_tf_threads
from helpers_pipeline import ROOT, drop, pipeline_session

from trainer.synth.wrong_inputs import KINDS, write_wrong_inputs
from worker.ops.supervisor import CXR_COMMAND

limit_tf_threads(2)

N_CHEST = 100
N_WRONG = 20


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    return train_gated_model(tmp_path_factory.mktemp("gated"))


@pytest.fixture(scope="module")
def wrong(tmp_path_factory):
    return write_wrong_inputs(tmp_path_factory.mktemp("wrong"), N_WRONG, seed=4)


@pytest.mark.slow
def test_calibration_lowers_ece_and_the_band_holds_its_target_on_test(gated):
    cal, test = gated.abstention.calibration, gated.abstention.test
    print(f"\ntest split ({test['n_test']}): ECE {test['ece_before']:.4f} ->"
          f" {test['ece_after']:.4f}, Brier {test['brier_before']:.4f} ->"
          f" {test['brier_after']:.4f}; band {cal.band}, error outside"
          f" {test['error_outside']:.4f}, coverage {test['coverage']:.3f}")
    assert test["ece_after"] < test["ece_before"]
    assert test["error_outside"] <= cal.max_error
    assert 0.5 < test["coverage"] < 1.0  # a real band: some images flagged, most not


def _drop_all(pipeline, gated, wrong) -> dict[str, str]:
    """name -> kind ("chest" or the wrong kind), every file dropped into the inbox."""
    kinds = {}
    for path in gated.test_paths[:N_CHEST]:
        kinds[f"chest-{path.name}"] = "chest"
        drop(pipeline.inbox, f"chest-{path.name}", path.read_bytes())
    for path, kind in wrong:
        kinds[path.name] = kind
        drop(pipeline.inbox, path.name, path.read_bytes())
    return kinds


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_refuses_wrong_inputs_and_flags_uncertain_ones(gated, wrong, tmp_path):
    from helpers_abstain import publish_gated
    from helpers_models import register_tiny_bundle

    from trainer.model.calibration import in_band

    with pipeline_session(tmp_path, start=False) as pipeline:
        publish_gated(gated, pipeline.models_dir, pipeline.db_url)
        register_tiny_bundle(pipeline.db_url, pipeline.models_dir, "infection", input_size=SIZE)
        pipeline.start_worker()
        pipeline.start_watcher()
        kinds = _drop_all(pipeline, gated, wrong)
        rows = pipeline.wait_final(list(kinds), timeout=300)
        stored = pipeline.stored_paths()
        review = _cli_review(pipeline)
    chest = [rows[n] for n, k in kinds.items() if k == "chest"]
    accepted = [r for r in chest if r["status"] == "done"]
    print(f"\nchest films accepted {len(accepted)}/{len(chest)}")
    assert len(accepted) >= 0.99 * len(chest), [r["error"] for r in chest]
    for kind in KINDS:
        got = [rows[n] for n, k in kinds.items() if k == kind]
        refused = [r for r in got if r["status"] == "rejected"]
        print(f"{kind}: refused {len(refused)}/{len(got)}")
        assert len(refused) >= 0.95 * len(got), (kind, Counter(r["status"] for r in got))
    for name, row in rows.items():
        if row["status"] == "rejected":
            assert row["label"] is None and row["p_pneumonia"] is None
            assert row["review"] == "out_of_scope"
            assert row["error"].startswith("refused by the input gate")
            assert "score" in row["error"] and "threshold" in row["error"], row["error"]
            assert stored[name].parent == pipeline.rejected_dir and stored[name].is_file()
        else:
            assert row["status"] == "done" and row["label"], row
            assert row["gate_score"] is not None and row["gate_score"] <= 1.0
    band = gated.abstention.calibration.band
    flagged = {n for n, r in rows.items() if (r["review"] or "").startswith("uncertain")}
    assert flagged, "no chest film fell in the band"
    for name in flagged | {n for n in rows if rows[n]["status"] == "done"}:
        row = rows[name]
        uncertain_1 = bool(in_band(row["p_pneumonia"], band))
        assert (row["review"] == "uncertain:pneumonia") == uncertain_1, row
    wanted = {n for n, r in rows.items() if r["review"]}
    assert {r["file_name"] for r in review} == wanted


def _cli_review(pipeline) -> list[dict]:
    out = subprocess.run([*CXR_COMMAND, "results", "--review", "--limit", "0", "--format",
                          "json"], env=pipeline.env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_imported_model_with_a_reference_refuses_what_it_should(gated, wrong, tmp_path):
    """``cxr models import --reference`` on 40 known-good films, then ``cxr classify``."""
    import keras
    from helpers_abstain import chest

    model_file = tmp_path / "elsewhere.keras"
    keras.saving.save_model(gated.model, model_file)
    reference = tmp_path / "reference"
    _, _, paths = chest(tmp_path, 40, seed=7)
    reference.mkdir()
    for path in paths:
        shutil.copy(path, reference / path.name)
    env = {"CXR_DATA_DIR": str(tmp_path / "var"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    imported = _cxr(env, "models", "import", str(model_file), "--stage", "pneumonia",
                    "--classes", "NORMAL,PNEUMONIA", "--input-size", str(SIZE),
                    "--preprocess", "none", "--resize", "bilinear", "--promote",
                    "--reference", str(reference))
    assert "input gate fitted on 40 reference images" in imported
    files = [str(p) for p in gated.test_paths[:40]] + [str(p) for p, _ in wrong]
    lines = _cxr(env, "classify", *files, ok=False).splitlines()
    verdict = {line.split("\t")[0]: line.split("\t")[1] for line in lines if "\t" in line}
    chest_refused = [verdict[f].startswith("out_of_scope") for f in files[:40]]
    refused = [verdict[str(p)].startswith("out_of_scope") for p, _ in wrong]
    print(f"\nimported: chest refused {sum(chest_refused)}/40, wrong refused"
          f" {sum(refused)}/{len(refused)}")
    assert sum(chest_refused) <= 1
    assert sum(refused) >= 0.95 * len(refused)
    hand = next(str(p) for p, kind in wrong if kind == "hand")
    explained = _cxr(env, "explain", "--file", hand, "--out", str(tmp_path / "maps"), ok=False)
    assert f"{hand}: out_of_scope: refused by the input gate" in explained
    assert not list((tmp_path / "maps").glob("*.png"))


def _cxr(env: dict, *args: str, ok: bool = True) -> str:
    import os

    out = subprocess.run([*CXR_COMMAND, *args], env={**os.environ, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_gate_runs_before_stage_two_in_one_pass(gated, wrong, tmp_path):
    """In process: stage 2 is never given a refused image, and stage 1 runs once (its
    probability comes from the gate's pass)."""
    from helpers_models import make_tiny_bundle

    from trainer.model.bundle import load_bundle, save_bundle
    from worker.classify.gating import GateRefused, classify_gated, stage_model

    first = stage_model(1, 1, load_bundle(save_bundle(gated.model, gated.manifest,
                                                      tmp_path / "p", gated.extras)))
    infection_bundle = load_bundle(make_tiny_bundle(tmp_path, "infection", 1, SIZE, bias=0.0))
    seen = []

    class Recording:
        manifest = infection_bundle.manifest

        def predict_proba(self, batch):
            seen.append(np.asarray(batch).copy())
            return infection_bundle.predict_proba(batch)

    class Once:
        manifest = first.bundle.manifest

        def predict_proba(self, batch):
            raise AssertionError("stage 1 ran a second forward pass")

    from dataclasses import replace

    pneumonia = replace(first, bundle=Once())
    infection = stage_model(2, 1, Recording())
    pixels = np.concatenate([gated.test[:12], decoded([p for p, _ in wrong[::10]])])
    answers = classify_gated(pixels, pneumonia, infection)
    refused = [i for i, a in enumerate(answers) if isinstance(a, GateRefused)]
    assert set(range(12, len(pixels))) <= set(refused)
    shown = np.concatenate(seen) if seen else np.zeros((0,))
    for i in refused:
        assert not any(np.array_equal(pixels[i], s) for s in shown)
    assert all(a.label is None for a in answers if isinstance(a, GateRefused))


@pytest.mark.parametrize("flag", ["uncertain:pneumonia", None])
def test_results_view_has_gate_score_and_review(db_url, flag):
    from db import predictions, registry
    from db.images import record_image
    from db.predictions import Answer, Rejection
    from db.results import list_results
    from db.session import session_scope
    from db.vocabulary import Review

    with session_scope(db_url) as session:
        model = registry.register_version(session, stage="pneumonia", backbone="tiny")
        ok = record_image(session, sha256="a" * 64, file_name="ok.png", stored_path=None,
                          size_bytes=1).id
        out = record_image(session, sha256="b" * 64, file_name="knee.png", stored_path=None,
                           size_bytes=1).id
        row = dict(sha256="a" * 64, pneumonia_model_id=model.id, infection_model_id=None,
                   p_pneumonia=0.4, p_virus=None, label="NORMAL", threshold=0.5,
                   infection_threshold=None, gate_score=0.42, review=flag)
        predictions.record_batch(session, [Answer(ok, row)],
                                 [Rejection(out, "refused by the input gate", None,
                                            Review.OUT_OF_SCOPE, 3.5)], {})
    with session_scope(db_url) as session:
        rows = {r["file_name"]: r for r in list_results(session)}
        review = [r["file_name"] for r in list_results(session, review=True)]
    assert rows["ok.png"]["gate_score"] == pytest.approx(0.42)
    assert rows["ok.png"]["review"] == flag
    assert rows["knee.png"]["review"] == "out_of_scope" and rows["knee.png"]["label"] is None
    assert rows["knee.png"]["gate_score"] == pytest.approx(3.5)
    assert sorted(review) == sorted(["knee.png"] + (["ok.png"] if flag else []))


def test_the_review_flags_migration_steps_down_and_up_with_the_results_view(empty_db_url):
    from sqlalchemy import inspect

    from db.migrate import downgrade, upgrade
    from db.session import get_engine

    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspect(get_engine(empty_db_url)).get_columns(table)}

    upgrade(empty_db_url)
    assert {"gate_score", "review"} <= columns("results") & columns("predictions") & columns(
        "images")
    downgrade(empty_db_url, "0006")
    assert not {"gate_score", "review"} & (columns("results") | columns("predictions")
                                           | columns("images"))
    assert "heatmap_path" in columns("results")
    upgrade(empty_db_url)
    assert {"gate_score", "review"} <= columns("results")


def test_the_review_page_shows_the_flag(tmp_path):
    from datetime import UTC, datetime

    from worker.ops.review_page import render_review
    from worker.settings import Settings

    base = dict(sha256="a" * 64, p_virus=None, pneumonia_model=1, infection_model=None,
                received_at=datetime.now(UTC), finished_at=datetime.now(UTC), stored_path=None,
                heatmap_path=None, gate_score=0.3, error=None)
    rows = [dict(base, id=1, file_name="film.jpeg", status="done", label="NORMAL",
                 p_pneumonia=0.31, review="uncertain:pneumonia"),
            dict(base, id=2, file_name="knee.jpeg", status="rejected", label=None,
                 p_pneumonia=None, pneumonia_model=None, review="out_of_scope", gate_score=4.0,
                 error="refused by the input gate (out_of_scope): not a chest film")]
    page = render_review(rows, Settings(data_dir=tmp_path), since=datetime(2026, 1, 1, tzinfo=UTC))
    assert "review: uncertain:pneumonia" in page
    assert "rejected (out_of_scope)" in page and "refused by the input gate" in page
