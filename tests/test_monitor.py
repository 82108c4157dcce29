"""`cxr monitor`'s report from rows written directly (both backends): review flags are used
once the results view has a `review` column, and null before."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from db import registry
from db.labels import add_label
from db.models import Image, Prediction
from db.session import session_scope
from db.views import results_view
from db.vocabulary import ImageStatus
from worker.ops.monitor import build_report

CASES = [  # (truth, predicted label, p_pneumonia, review flag)
    ("NORMAL", "NORMAL", 0.1, None), ("NORMAL", "BACTERIA", 0.8, "uncertain"),
    ("VIRUS", "VIRUS", 0.9, None), ("BACTERIA", "NORMAL", 0.3, "uncertain"),
    ("BACTERIA", "BACTERIA", 0.7, "uncertain"),
]


def _rows(db_url: str) -> list[int]:
    with session_scope(db_url) as s:
        model = registry.register_version(s, stage="pneumonia", backbone="tiny").id
        ids = []
        for i, (truth, label, p, _) in enumerate(CASES):
            pred = Prediction(sha256=f"{i:064x}", pneumonia_model_id=model, p_pneumonia=p,
                              label=label, threshold=0.5)
            s.add(pred)
            s.flush()
            image = Image(sha256=f"{i:064x}", file_name=f"{i}.png", status=ImageStatus.DONE,
                          prediction_id=pred.id)
            s.add(image)
            s.flush()
            add_label(s, image.id, truth, "review", "test")
            ids.append(image.id)
        return ids


def test_review_flags_count_only_once_the_column_exists(db_url):
    ids = _rows(db_url)
    with session_scope(db_url) as s:  # the view as it was before the abstain migration
        s.execute(text("DROP VIEW results"))
        s.execute(text(results_view("0008")))
    before = build_report(db_url)["versions"][0]
    assert before["n_labelled"] == 5 and before["review_share"] is None
    assert before["sensitivity"] == pytest.approx(2 / 3)
    assert before["specificity"] == pytest.approx(1 / 2)
    assert before["cascade_accuracy"] == pytest.approx(3 / 5)
    flags = " ".join(f"WHEN {i} THEN '{flag}'" for i, (*_, flag) in zip(ids, CASES, strict=True)
                     if flag)
    view = results_view("0006").replace(
        "i.error AS error,", f"i.error AS error, CASE i.id {flags} ELSE '' END AS review,")
    with session_scope(db_url) as s:
        s.execute(text("DROP VIEW results"))
        s.execute(text(view))
    after = build_report(db_url)["versions"][0]
    assert after["review_share"] == pytest.approx(3 / 5)
    assert after["flagged_wrong"] == pytest.approx(2 / 3)  # NORMAL->BACTERIA, BACTERIA->NORMAL
    assert after["review_share_ci"][0] < 0.6 < after["review_share_ci"][1]


def test_a_shift_in_the_input_gates_scores_raises_a_drift_alarm(db_url):
    """The gate's scores are part of the input mix: a day whose images sit near or past the
    threshold, after days of images far inside it, is flagged; the quiet days are not."""
    from datetime import UTC, datetime, timedelta

    from worker.ops.monitor_drift import drift_report, gate_band

    assert [gate_band(s) for s in (None, 0.2, 0.9, 1.7)] == [
        "no gate", "<0.5", "0.8-1 (passed)", ">1 (refused)"]
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    with session_scope(db_url) as s:
        for i in range(60):
            shifted = i >= 30
            s.add(Image(sha256=f"{i:064x}", file_name=f"{i}.png", status=ImageStatus.REJECTED,
                        received_at=today - timedelta(days=0 if shifted else 2),
                        gate_score=1.6 if shifted and i % 2 else 0.95 if shifted else 0.3))
    with session_scope(db_url) as s:
        report = drift_report(s, [], today - timedelta(days=7), 0.2)
    days = {d["day"]: d for d in report["days"]}
    assert [d["psi_vs_earlier"]["gate"] for d in report["days"]][0] is None  # nothing before it
    shifted_day = days[today.date().isoformat()]
    assert shifted_day["input"]["gate"] == {"0.8-1 (passed)": 0.5, ">1 (refused)": 0.5}
    assert shifted_day["psi_vs_earlier"]["gate"] > 0.2
    assert any("gate mix PSI" in alarm for alarm in report["alarms"])
    assert "gate score" not in report["not_measured"]
