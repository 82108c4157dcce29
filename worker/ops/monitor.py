"""`cxr monitor`: is each model version right on this site's images, and is anything drifting.

Ground truth (``db.labels``) comes back late and for some images only, so two questions:
each version measured on its labelled images (overall and per week, 95 % intervals), and, for
every day, what came in and what the models answered, against the validation reference stored
in each bundle (``worker.ops.monitor_drift``). The report is a plain dict: the CLI prints it as
text or JSON, ``worker.ops.monitor_plots`` draws it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from db import monitoring
from db.session import session_scope
from db.vocabulary import CASCADE_CLASSES, DISCLAIMER, Label, Stage
from trainer.training.monitoring_stats import accuracy_summary, binary_summary
from worker.ops.monitor_drift import drift_report


def week_of(when: datetime) -> str:
    """ISO week of a time (UTC), e.g. ``2026-W49``."""
    year, week, _ = when.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def build_report(db_url: str, *, days: int = 14, psi_threshold: float = 0.2,
                 now: datetime | None = None) -> dict[str, Any]:
    """Everything `cxr monitor` shows, as JSON-ready values."""
    now = now or datetime.now(UTC)
    since = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    with session_scope(db_url) as session:
        versions = monitoring.served_versions(session)
        labelled = monitoring.labelled_predictions(session)
        flags = monitoring.review_flags(session)
        drift = drift_report(session, versions, since, psi_threshold)
    return {
        "generated_at": now.isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "versions": [version_figures(v, labelled, flags) for v in versions],
        "drift": drift,
        "drifted": bool(drift["alarms"]),
    }


def version_figures(version: dict[str, Any], labelled: list[dict[str, Any]],
                    flags: dict[int, str | None] | None) -> dict[str, Any]:
    """One version's figures on its labelled images, overall and per week of arrival."""
    stage = version["stage"]
    key = "pneumonia_model_id" if stage == Stage.PNEUMONIA else "infection_model_id"
    newest: dict[int, dict[str, Any]] = {}
    for row in labelled:  # one answer per image: its newest prediction by this version
        if row[key] == version["id"]:
            newest[row["image_id"]] = row
    rows = list(newest.values())
    weeks: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        weeks[week_of(row["received_at"])].append(row)
    figures = _figures(stage, rows, flags)
    return {"model": version["name"], "stage": stage, "status": version["status"], **figures,
            "weeks": [{"week": week, **_figures(stage, weeks[week], flags)}
                      for week in sorted(weeks)]}


def _figures(stage: str, rows: list[dict[str, Any]], flags: dict[int, str | None] | None
             ) -> dict[str, Any]:
    if stage == Stage.PNEUMONIA:
        out = binary_summary([r["truth"] != Label.NORMAL for r in rows],
                             [r["predicted"] != Label.NORMAL for r in rows],
                             [r["p_pneumonia"] for r in rows])
        three = [r for r in rows
                 if r["truth"] in CASCADE_CLASSES and r["predicted"] in CASCADE_CLASSES]
        out |= accuracy_summary([r["truth"] == r["predicted"] for r in three],
                                "cascade_accuracy")
    else:
        two = [r for r in rows if r["truth"] in (Label.BACTERIA, Label.VIRUS)
               and r["p_virus"] is not None]
        out = {"n_labelled": len(rows)}
        summary = binary_summary([r["truth"] == Label.VIRUS for r in two],
                                 [r["predicted"] == Label.VIRUS for r in two],
                                 [r["p_virus"] for r in two])
        out |= {k: summary[k] for k in ("accuracy", "accuracy_ci", "auc", "auc_ci")}
        out["n_infection_labelled"] = len(two)
    return out | _review(rows, flags)


def _review(rows: list[dict[str, Any]], flags: dict[int, str | None] | None) -> dict[str, Any]:
    """Share of these images the review flag marked, and how often a flagged answer was wrong
    (null before the review flag exists)."""
    if flags is None:
        return {"review_share": None, "review_share_ci": None,
                "flagged_wrong": None, "flagged_wrong_ci": None}
    flagged = [r for r in rows if flags.get(r["image_id"])]
    share = accuracy_summary([bool(flags.get(r["image_id"])) for r in rows], "review_share")
    wrong = accuracy_summary([_wrong(r) for r in flagged], "flagged_wrong")
    return {k: v for k, v in (share | wrong).items() if not k.startswith("n_")}


def _wrong(row: dict[str, Any]) -> bool:
    """The answer disagrees with the truth (at stage 1 when the truth has no type)."""
    if row["truth"] == Label.PNEUMONIA or row["predicted"] == Label.PNEUMONIA:
        return (row["truth"] == Label.NORMAL) != (row["predicted"] == Label.NORMAL)
    return row["truth"] != row["predicted"]
