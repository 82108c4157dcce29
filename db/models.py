"""SQLAlchemy 2 models: received images, the model registry and predictions.

The ``results`` view (``db.views``, made by the migrations) joins them into one readable row
per received file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.identifiers import MAX_LENGTH
from db.vocabulary import ImageStatus, ModelStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Image(Base):
    """One row per file taken from the inbox (the same content twice gives two rows)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    file_name: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=ImageStatus.RECEIVED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    """``host:pid`` of the worker process that last claimed the row (not patient data)."""
    claimed_at: Mapped[datetime | None]
    task_id: Mapped[str | None] = mapped_column(String(64))
    """The Celery task (one message, several images) that last claimed the row."""
    study_instance_uid: Mapped[str | None] = mapped_column(String(MAX_LENGTH), index=True)
    """DICOM identifiers (db.identifiers): set for DICOM files only, never patient data."""
    series_instance_uid: Mapped[str | None] = mapped_column(String(MAX_LENGTH))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(MAX_LENGTH))
    accession_number: Mapped[str | None] = mapped_column(String(MAX_LENGTH), index=True)
    modality: Mapped[str | None] = mapped_column(String(MAX_LENGTH))
    view_position: Mapped[str | None] = mapped_column(String(MAX_LENGTH))
    gate_score: Mapped[float | None] = mapped_column(Float)
    review: Mapped[str | None] = mapped_column(String(32))
    """Set on an image the input gate refused (``out_of_scope``, no prediction); a classified
    image's flag and score are its prediction's."""

    prediction: Mapped[Prediction | None] = relationship()


class ModelVersion(Base):
    """A registered model bundle; at most one ``production`` row per stage (a partial index)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("stage", "version", name="uq_model_versions_stage_version"),
        Index(
            "uq_model_versions_one_production",
            "stage",
            unique=True,
            sqlite_where=text("status = 'production'"),
            postgresql_where=text("status = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(20))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=ModelStatus.CANDIDATE)
    backbone: Mapped[str] = mapped_column(String(64))
    bundle_path: Mapped[str] = mapped_column(Text)
    bundle_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(64))
    parent_version: Mapped[int | None] = mapped_column(Integer)
    code_version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]

    @property
    def name(self) -> str:
        return f"{self.stage}/v{self.version}"


class Prediction(Base):
    """One cascade output per (content, stage-1 version, stage-2 version).

    ``infection_key`` is the stage-2 model id or 0, so the unique key holds even when stage 2
    did not run (NULLs never collide in a unique index).
    """

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint(
            "sha256", "pneumonia_model_id", "infection_key", name="uq_predictions_content_models"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    pneumonia_model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    infection_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    infection_key: Mapped[int] = mapped_column(Integer, default=0)
    p_pneumonia: Mapped[float] = mapped_column(Float)
    p_virus: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    infection_threshold: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    """The Grad-CAM picture of this prediction (``heatmaps/...``, relative to the data dir):
    per prediction, since another model looks elsewhere."""
    gate_score: Mapped[float | None] = mapped_column(Float)
    """The stage-1 bundle's learned gate score over its threshold (refused above 1); None
    without a gate."""
    review: Mapped[str | None] = mapped_column(String(32))
    """``uncertain:<stage>`` when a calibrated probability lay in its band, else None."""

    pneumonia_model: Mapped[ModelVersion] = relationship(foreign_keys=[pneumonia_model_id])
    infection_model: Mapped[ModelVersion | None] = relationship(foreign_keys=[infection_model_id])


class Deployment(Base):
    """This database's identity: one row, a random id made once. Messages carry it, so a
    worker on a Redis that two deployments share leaves the other one's messages alone."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
