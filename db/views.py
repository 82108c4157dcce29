"""The ``results`` view, as each migration that (re)creates it defines it.

A migration must build the view of its own revision, never the newest one: upgrading an empty
database runs 0001 before the columns that later views read exist.
"""

from __future__ import annotations

_COMMON_COLUMNS = """SELECT i.id AS id,
       i.file_name AS file_name,
       i.sha256 AS sha256,
       i.status AS status,
       p.label AS label,
       p.p_pneumonia AS p_pneumonia,
       p.p_virus AS p_virus,
       m1.version AS pneumonia_model,
       m2.version AS infection_model,
       i.received_at AS received_at,
       i.finished_at AS finished_at,
       i.error AS error,
       i.attempts AS attempts,
       p.threshold AS threshold,
       p.inference_ms AS inference_ms"""

_DICOM_COLUMNS = """       i.study_instance_uid AS study_instance_uid,
       i.series_instance_uid AS series_instance_uid,
       i.sop_instance_uid AS sop_instance_uid,
       i.accession_number AS accession_number,
       i.modality AS modality,
       i.view_position AS view_position"""

_JOINS = """
FROM images i
LEFT JOIN predictions p ON p.id = i.prediction_id
LEFT JOIN model_versions m1 ON m1.id = p.pneumonia_model_id
LEFT JOIN model_versions m2 ON m2.id = p.infection_model_id
"""

_VIEWS = {
    "0001": f"CREATE VIEW results AS\n{_COMMON_COLUMNS}{_JOINS}",
    "0003": f"CREATE VIEW results AS\n{_COMMON_COLUMNS},\n       i.task_id AS task_id{_JOINS}",
    "0004": f"CREATE VIEW results AS\n{_COMMON_COLUMNS},\n       i.task_id AS task_id,\n"
            f"{_DICOM_COLUMNS}{_JOINS}",
    "0005": f"CREATE VIEW results AS\n{_COMMON_COLUMNS},\n       i.task_id AS task_id,\n"
            f"{_DICOM_COLUMNS},\n       p.heatmap_path AS heatmap_path{_JOINS}",
    "0009": f"CREATE VIEW results AS\n{_COMMON_COLUMNS},\n       i.task_id AS task_id,\n"
            f"{_DICOM_COLUMNS},\n       p.heatmap_path AS heatmap_path,\n"
            "       COALESCE(p.gate_score, i.gate_score) AS gate_score,\n"
            f"       COALESCE(p.review, i.review) AS review{_JOINS}",
}


def results_view(revision: str) -> str:
    """``CREATE VIEW results`` as of ``revision`` (the latest definition at or before it)."""
    known = [r for r in sorted(_VIEWS) if r <= revision]
    if not known:
        raise KeyError(f"no results view at revision {revision}")
    return _VIEWS[known[-1]]
