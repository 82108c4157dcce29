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
