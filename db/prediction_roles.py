"""Queries of the safe rollout: which prediction an image got in which role, an image's
history, and the production and candidate predictions of the same images (``cxr models
compare``). The statistics on them are pure functions in ``trainer.training.rollout_stats``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, aliased

from db.models import Image, ImagePrediction, ModelVersion, Prediction, utcnow
from db.vocabulary import ImageStatus, Label, Stage


class Role:
    """Why an image has a prediction: what it showed when classified, a shadow's answer, a
    re-score's answer (which it then shows)."""

    PRODUCTION = "production"
    SHADOW = "shadow"
    RESCORE = "rescore"


def link_roles(session: Session, links: Iterable[tuple[int, int, str]]) -> None:
    """Record (image id, prediction id, role) triples; ones already recorded are left."""
    values = [{"image_id": i, "prediction_id": p, "role": r, "created_at": utcnow()}
              for i, p, r in dict.fromkeys(links)]
    if not values:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    session.execute(upsert(ImagePrediction.__table__).on_conflict_do_nothing(
        index_elements=["image_id", "prediction_id", "role"]), values)


@dataclass(frozen=True)
class HistoryRow:
    role: str
    at: datetime
    label: str
    p_pneumonia: float
    p_virus: float | None
    pneumonia_model: int
    infection_model: int | None
    shown: bool
    """The prediction the image's row shows now."""


def image_history(session: Session, image_id: int) -> list[HistoryRow]:
    """Every prediction ``image_id`` has had, oldest first, with its versions and role."""
    m1, m2 = aliased(ModelVersion), aliased(ModelVersion)
    rows = session.execute(
        select(ImagePrediction.role, ImagePrediction.created_at, Prediction.label,
               Prediction.p_pneumonia, Prediction.p_virus, m1.version, m2.version,
               Prediction.id, Image.prediction_id)
        .join(Prediction, Prediction.id == ImagePrediction.prediction_id)
        .join(Image, Image.id == ImagePrediction.image_id)
        .join(m1, m1.id == Prediction.pneumonia_model_id)
        .outerjoin(m2, m2.id == Prediction.infection_model_id)
        .where(ImagePrediction.image_id == image_id)
        .order_by(ImagePrediction.id)
    )
    return [HistoryRow(role, at, label, p1, p2, v1, v2, pid == shown)
            for role, at, label, p1, p2, v1, v2, pid, shown in rows]


@dataclass(frozen=True)
class Pair:
    """One image as production answered it (its row) and as the candidate did."""

    image_id: int
    production_version: int
    production_label: str
    production_p: float
    candidate_label: str
    candidate_p: float


def compare_pairs(session: Session, stage: str, candidate_id: int,
                  since: datetime | None = None) -> list[Pair]:
    """The done images that both the shown (production) prediction and ``candidate_id``
    answered, oldest first. Stage 1 compares NORMAL / PNEUMONIA on ``p_pneumonia``; stage 2
    compares BACTERIA / VIRUS on ``p_virus`` where both ran stage 2 after the same stage 1."""
    shown, cand = aliased(Prediction), aliased(Prediction)
    first = Stage(stage) == Stage.PNEUMONIA
    if first:
        on = and_(cand.sha256 == shown.sha256, cand.pneumonia_model_id == candidate_id)
        prod_model, cand_p, prod_p = shown.pneumonia_model_id, cand.p_pneumonia, shown.p_pneumonia
    else:
        on = and_(cand.sha256 == shown.sha256, cand.infection_model_id == candidate_id,
                  cand.pneumonia_model_id == shown.pneumonia_model_id,
                  shown.p_virus.is_not(None))
        prod_model, cand_p, prod_p = shown.infection_model_id, cand.p_virus, shown.p_virus
    query = (
        select(Image.id, ModelVersion.version, shown.label, prod_p, cand.label, cand_p)
        .join(shown, shown.id == Image.prediction_id)
        .join(cand, on)
        .join(ModelVersion, ModelVersion.id == prod_model)
        .where(Image.status == ImageStatus.DONE, prod_model != candidate_id)
        .order_by(Image.id)
    )
    if since is not None:
        query = query.where(Image.received_at >= since.astimezone(UTC))
    pairs: dict[int, Pair] = {}
    for image_id, version, p_label, p_value, c_label, c_value in session.execute(query):
        pairs.setdefault(image_id, Pair(image_id, version, _binary(p_label, first),
                                        float(p_value), _binary(c_label, first), float(c_value)))
    return list(pairs.values())


def _binary(label: str, first_stage: bool) -> str:
    """A cascade label as the stage's own answer (stage 1: NORMAL or PNEUMONIA)."""
    if first_stage:
        return Label.NORMAL.value if label == Label.NORMAL else Label.PNEUMONIA.value
    return label
