"""Predictions: one row per content and model versions, linked to every image of that content.

Keyed by (sha256, stage-1 model, stage-2 model), so two deliveries that both finish, or a copy of
an image already classified, share one row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from db import images
from db.identifiers import DicomIdentifiers
from db.models import Image, Prediction, utcnow
from db.prediction_roles import Role, link_roles
from db.vocabulary import OPEN_STATUSES, ImageStatus, Label


def current_predictions(
    session: Session, sha256s: Iterable[str], pneumonia_model_id: int,
    infection_model_id: int | None,
) -> dict[str, int]:
    """sha256 -> id of a prediction still valid for these production models, for a batch in
    one query. A NORMAL made by the same stage-1 model never ran stage 2, so it stays valid
    whatever the infection model is now."""
    shas = list(set(sha256s))
    if not shas:
        return {}
    same_models = (Prediction.infection_key == (infection_model_id or 0))
    if infection_model_id is not None:
        same_models |= Prediction.label == Label.NORMAL
    rows = session.execute(
        select(Prediction.sha256, Prediction.id, Prediction.infection_key).where(
            Prediction.sha256.in_(shas),
            Prediction.pneumonia_model_id == pneumonia_model_id,
            same_models,
        )
    )
    found: dict[str, int] = {}
    for sha, prediction_id, key in rows:
        if sha not in found or key == (infection_model_id or 0):
            found[sha] = prediction_id
    return found


def link_prediction(session: Session, image_id: int, prediction_id: int) -> bool:
    """Mark an open image done with an existing prediction; False if it was already final."""
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status.in_(OPEN_STATUSES))
        .values(
            status=ImageStatus.DONE, prediction_id=prediction_id, error=None, finished_at=utcnow()
        )
    )
    if result.rowcount != 1:
        return False
    link_roles(session, [(image_id, prediction_id, Role.PRODUCTION)])  # its history too
    return True


def _values(r: dict, now) -> dict:
    """One ``save_predictions`` row as the predictions table stores it."""
    return {
        "sha256": r["sha256"],
        "pneumonia_model_id": r["pneumonia_model_id"],
        "infection_model_id": r["infection_model_id"],
        "infection_key": r["infection_model_id"] or 0,
        "p_pneumonia": float(r["p_pneumonia"]),
        "p_virus": None if r["p_virus"] is None else float(r["p_virus"]),
        "label": str(r["label"]),
        "threshold": float(r["threshold"]),
        "infection_threshold": None if r["infection_threshold"] is None
        else float(r["infection_threshold"]),
        "inference_ms": r.get("inference_ms"),
        "heatmap_path": r.get("heatmap_path"),
        "gate_score": r.get("gate_score"),
        "review": r.get("review"),
        "created_at": now,
    }


def save_predictions(session: Session, rows: list[dict]) -> list[int]:
    """Insert-or-get predictions on (sha256, pneumonia model, infection model), so a content
    is never predicted twice by the same models: one insert-or-ignore and one read for the
    batch; ids in the order given.

    Each row has ``sha256``, ``pneumonia_model_id``, ``infection_model_id``, ``p_pneumonia``,
    ``p_virus``, ``label``, ``threshold``, ``infection_threshold``, ``inference_ms`` and
    optionally ``heatmap_path``, ``gate_score`` and ``review``.
    """
    if not rows:
        return []
    now = utcnow()
    values = [_values(r, now) for r in rows]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:
        raise NotImplementedError(f"prediction upsert not written for {dialect}")
    session.execute(
        upsert(Prediction.__table__).on_conflict_do_nothing(
            index_elements=["sha256", "pneumonia_model_id", "infection_key"]),
        values,
    )
    keys = {(v["sha256"], v["pneumonia_model_id"], v["infection_key"]) for v in values}
    found = {
        (row.sha256, row.pneumonia_model_id, row.infection_key): row.id
        for row in session.execute(
            select(Prediction.id, Prediction.sha256, Prediction.pneumonia_model_id,
                   Prediction.infection_key)
            .where(Prediction.sha256.in_({k[0] for k in keys}),
                   Prediction.pneumonia_model_id.in_({k[1] for k in keys}))
        )
    }
    ids = [found[(v["sha256"], v["pneumonia_model_id"], v["infection_key"])] for v in values]
    for prediction_id, v in zip(ids, values, strict=True):
        if v["heatmap_path"] is not None:  # a heatmap made now goes on a prediction without one
            session.execute(
                update(Prediction)
                .where(Prediction.id == prediction_id, Prediction.heatmap_path.is_(None))
                .values(heatmap_path=v["heatmap_path"])
                .execution_options(synchronize_session=False)
            )
    return ids


def link_predictions(session: Session, links: list[tuple[int, int]],
                     notes: Mapping[int, str] | None = None) -> None:
    """Mark open images done with existing predictions, (image id, prediction id) pairs in one
    statement; final ones are left as they are. ``notes`` (image id -> text) go in ``error``
    of a done image: how it was read (an unknown view taken as frontal)."""
    if not links:
        return
    table = Image.__table__
    session.execute(
        update(table)
        .where(table.c.id == bindparam("image"),
               or_(*(table.c.status == status for status in OPEN_STATUSES)))
        .values(status=ImageStatus.DONE, prediction_id=bindparam("prediction"),
                error=bindparam("note"), finished_at=utcnow()),
        [{"image": image_id, "prediction": prediction_id, "note": (notes or {}).get(image_id)}
         for image_id, prediction_id in links],
    )


@dataclass(frozen=True)
class Answer:
    """A classified image: its prediction row (``save_predictions``) and how it was read."""

    image_id: int
    row: dict
    note: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A refused image: the reason and where its file now lies in ``rejected/``; an image the
    input gate refused also carries ``review`` (``out_of_scope``) and its gate score."""

    image_id: int
    reason: str
    stored_path: str | None = None
    review: str | None = None
    gate_score: float | None = None


def record_batch(session: Session, answers: list[Answer], rejections: list[Rejection],
                 identifiers: Mapping[int, DicomIdentifiers],
                 shadows: list[Answer] | None = None) -> None:
    """Everything a classified batch ends with, in the caller's one transaction: the DICOM
    identifiers read, the refusals, the predictions linked to their images, and the shadow
    versions' predictions (in the image's history only, never its row)."""
    for image_id, values in identifiers.items():
        images.set_identifiers(session, image_id, values)
    for refused in rejections:
        images.mark_rejected(session, refused.image_id, refused.reason,
                             stored_path=refused.stored_path, review=refused.review,
                             gate_score=refused.gate_score)
    prediction_ids = save_predictions(session, [a.row for a in answers])
    link_predictions(session, [(a.image_id, prediction_id)
                               for a, prediction_id in zip(answers, prediction_ids, strict=True)],
                     {a.image_id: a.note for a in answers if a.note})
    shadow_ids = save_predictions(session, [s.row for s in shadows or []])
    link_roles(session, [
        *((a.image_id, p, Role.PRODUCTION) for a, p in zip(answers, prediction_ids, strict=True)),
        *((s.image_id, p, Role.SHADOW) for s, p in zip(shadows or [], shadow_ids, strict=True)),
    ])
