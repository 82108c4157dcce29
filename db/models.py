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


class DicomOutbox(Base):
    """One DICOM object (a result SR or a heatmap SC) for one destination, until it is sent.

    The object's UIDs are chosen when the row is made, so every retry sends the same instance
    (a PACS that got it before keeps one copy). ``destination`` is ``AE@host:port`` or
    ``export`` (the folder CXR_DICOM_EXPORT_DIR).
    """

    __tablename__ = "dicom_outbox"
    __table_args__ = (
        UniqueConstraint("image_id", "kind", "destination", name="uq_dicom_outbox_item"),
        Index("ix_dicom_outbox_due", "sent_at", "next_try_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    kind: Mapped[str] = mapped_column(String(8))
    destination: Mapped[str] = mapped_column(String(300))
    sop_instance_uid: Mapped[str] = mapped_column(String(MAX_LENGTH))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_try_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]

class GroundTruth(Base):
    """A true label given to an image (``db.labels``): the newest row per image is current,
    earlier ones stay as history."""

    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_image_id", "image_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", name="fk_labels_image_id"))
    label: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    labelled_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelShadow(Base):
    """The version a stage's workers also run beside production (``cxr models shadow``): the
    stage is the key, so a stage has one shadow at most."""

    __tablename__ = "model_shadows"

    stage: Mapped[str] = mapped_column(String(20), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImagePrediction(Base):
    """Every prediction an image has had and why (``production``, ``shadow``, ``rescore``);
    ``images.prediction_id`` stays the one its row shows."""

    __tablename__ = "image_predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "prediction_id", "role", name="uq_image_predictions"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Who changed what the service answers with: promote, rollback, shadow, import, rescore."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(20))
    version: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The versions involved (``from``, ``to``), filters, counts: never patient data."""
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RescoreJob(Base):
    """A re-score of past images with the production models of its start: its filters, the
    target versions and a cursor (the highest image id sent), so a killed run resumes."""

    __tablename__ = "rescore_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pneumonia_model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    infection_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[str] = mapped_column(String(16), default="running")
    cursor: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """image id -> why it kept its prediction (its archived file is gone or unreadable)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
