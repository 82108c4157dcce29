"""Model registry queries: versions per stage, promotion, rollback.

Follows MLflow's SQLAlchemy store: version numbers are max + 1 per stage and a unique key
turns a race into a retry; the database's partial unique index guarantees at most one
``production`` row per stage, and promotion archives the previous one in the same transaction.
Like MLflow's store, every public function returns a plain ``RegisteredModel``, never an ORM row
that outlives its session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db.exceptions import CxrError, ModelNotFoundError
from db.models import ModelShadow, ModelVersion, utcnow
from db.vocabulary import ModelStatus, Stage

VERSION_RETRIES = 20
T = TypeVar("T")


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model version as the rest of the product sees it."""

    id: int
    stage: str
    version: int
    status: str
    backbone: str
    bundle_path: str
    bundle_sha256: str | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    dataset_fingerprint: str | None
    parent_version: int | None
    code_version: str | None
    created_at: datetime | None
    promoted_at: datetime | None
    shadow: bool = False
    """Workers also run it beside production (``cxr models shadow``); never shown as a label."""

    @property
    def name(self) -> str:
        return f"{self.stage}/v{self.version}"


def _entity(row: ModelVersion) -> RegisteredModel:
    return RegisteredModel(
        id=row.id, stage=row.stage, version=row.version, status=str(row.status),
        backbone=row.backbone, bundle_path=row.bundle_path, bundle_sha256=row.bundle_sha256,
        metrics=dict(row.metrics or {}), params=dict(row.params or {}),
        dataset_fingerprint=row.dataset_fingerprint, parent_version=row.parent_version,
        code_version=row.code_version, created_at=row.created_at, promoted_at=row.promoted_at,
    )


def _check_stage(stage: str) -> str:
    try:
        return Stage(stage).value
    except ValueError:
        choices = ", ".join(s.value for s in Stage)
        raise CxrError(f"unknown stage {stage!r} (choose from {choices})") from None


def register_version(
    session: Session,
    *,
    stage: str,
    backbone: str,
    metrics: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    dataset_fingerprint: str | None = None,
    parent_version: int | None = None,
    code_version: str | None = None,
    bundle_sha256: str | None = None,
) -> RegisteredModel:
    """Add a ``candidate`` version numbered max + 1 for its stage and flush it (not commit).

    ``bundle_path`` is ``<stage>/v<N>``, relative to the models dir so hosts sharing the models
    volume at different mount points agree. Two writers racing for N: the loser's insert hits the
    unique key inside a savepoint and tries the next number.
    """
    stage = _check_stage(stage)
    for _ in range(VERSION_RETRIES):
        current = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.stage == stage)
        )
        version = (current or 0) + 1
        row = ModelVersion(
            stage=stage,
            version=version,
            status=ModelStatus.CANDIDATE,
            backbone=backbone,
            bundle_path=f"{stage}/v{version}",
            bundle_sha256=bundle_sha256,
            metrics=metrics or {},
            params=params or {},
            dataset_fingerprint=dataset_fingerprint,
            parent_version=parent_version,
            code_version=code_version,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue
        return _entity(row)
    raise CxrError(f"could not allocate a version for stage {stage} after {VERSION_RETRIES} tries")


def set_bundle_sha256(session: Session, model_id: int, sha256: str) -> None:
    """Record the bundle's hash once its files are written (workers check it before loading)."""
    session.execute(update(ModelVersion).where(ModelVersion.id == model_id)
                    .values(bundle_sha256=sha256))


def get_version(session: Session, stage: str, version: int) -> RegisteredModel:
    return _entity(_version_row(session, stage, version))


def _version_row(session: Session, stage: str, version: int) -> ModelVersion:
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.stage == _check_stage(stage), ModelVersion.version == version
        )
    )
    if row is None:
        raise ModelNotFoundError(f"no model {stage}/v{version}; see `cxr models list`")
    return row


def get_by_id(session: Session, model_id: int) -> RegisteredModel:
    """The registered version with this id (a prediction names its models by id)."""
    row = session.get(ModelVersion, model_id)
    if row is None:
        raise ModelNotFoundError(f"no registered model with id {model_id}")
    return _entity(row)


def get_production(session: Session, stage: str) -> RegisteredModel | None:
    row = _production_row(session, stage)
    return None if row is None else _entity(row)


def _production_row(session: Session, stage: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.stage == _check_stage(stage),
            ModelVersion.status == ModelStatus.PRODUCTION,
        )
    )


def has_production(session: Session, stage: str = Stage.PNEUMONIA) -> bool:
    """Whether ``stage`` has a production version: without a pneumonia model images wait."""
    return Stage(stage).value in production_ids(session)


def production_ids(session: Session) -> dict[str, int]:
    """stage -> id of its production version; the workers' cheap per-batch freshness check."""
    rows = session.execute(
        select(ModelVersion.stage, ModelVersion.id).where(
            ModelVersion.status == ModelStatus.PRODUCTION
        )
    )
    return {stage: model_id for stage, model_id in rows}


def list_versions(session: Session, stage: str | None = None) -> list[RegisteredModel]:
    query = select(ModelVersion).order_by(ModelVersion.stage, ModelVersion.version)
    if stage is not None:
        query = query.where(ModelVersion.stage == _check_stage(stage))
    shadows = set(shadow_ids(session).values())
    return [replace(_entity(row), shadow=row.id in shadows) for row in session.scalars(query)]


def _lock_stage(session: Session, stage: str) -> None:
    """Serialise promotions of one stage (row locks on PostgreSQL; SQLite locks the file)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        session.execute(
            select(ModelVersion.id).where(ModelVersion.stage == stage).with_for_update()
        )


def promote(session: Session, stage: str, version: int) -> RegisteredModel:
    """Make ``stage/vN`` production and archive the previous production version, atomically."""
    stage = _check_stage(stage)
    _lock_stage(session, stage)
    target = _version_row(session, stage, version)
    if target.status == ModelStatus.PRODUCTION:
        return _entity(target)
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.stage == stage, ModelVersion.status == ModelStatus.PRODUCTION)
        .values(status=ModelStatus.ARCHIVED)
    )
    session.flush()
    target.status = ModelStatus.PRODUCTION
    target.promoted_at = utcnow()
    session.execute(delete(ModelShadow).where(ModelShadow.model_id == target.id))
    session.flush()
    return _entity(target)


def rollback(session: Session, stage: str) -> RegisteredModel:
    """Return to the version that was production before the current one.

    Earlier production versions are the archived ones with a ``promoted_at``; the latest one
    promoted before the current version wins, so repeated rollbacks walk back in time.
    """
    stage = _check_stage(stage)
    _lock_stage(session, stage)
    current = _production_row(session, stage)
    if current is None:
        raise ModelNotFoundError(f"no production model for stage {stage}: nothing to roll back")
    previous = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.stage == stage,
            ModelVersion.status == ModelStatus.ARCHIVED,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.promoted_at < current.promoted_at,
        )
        .order_by(ModelVersion.promoted_at.desc())
        .limit(1)
    )
    if previous is None:
        raise ModelNotFoundError(
            f"{current.name} was the first production model of {stage}: nothing to roll back to"
        )
    current.status = ModelStatus.ARCHIVED
    session.flush()
    previous.status = ModelStatus.PRODUCTION
    session.flush()
    return _entity(previous)


def shadow_ids(session: Session) -> dict[str, int]:
    """stage -> id of its shadow version (checked per batch, like ``production_ids``)."""
    return dict(session.execute(select(ModelShadow.stage, ModelShadow.model_id)).all())


def get_shadow(session: Session, stage: str) -> RegisteredModel | None:
    model_id = shadow_ids(session).get(_check_stage(stage))
    return None if model_id is None else replace(get_by_id(session, model_id), shadow=True)


def set_shadow(session: Session, stage: str, version: int) -> tuple[RegisteredModel,
                                                                     RegisteredModel | None]:
    """Make ``stage/vN`` the stage's shadow, replacing any other; (it, the one it replaced).
    The production version cannot shadow itself."""
    stage = _check_stage(stage)
    _lock_stage(session, stage)
    target = _version_row(session, stage, version)
    if target.status == ModelStatus.PRODUCTION:
        raise CxrError(f"{target.name} is the production model; shadow a candidate instead")
    previous = get_shadow(session, stage)
    session.execute(delete(ModelShadow).where(ModelShadow.stage == stage))
    session.add(ModelShadow(stage=stage, model_id=target.id))
    session.flush()
    return replace(_entity(target), shadow=True), previous


def clear_shadow(session: Session, stage: str) -> RegisteredModel | None:
    """Stop shadowing in ``stage``; the version that was shadowing, if any."""
    previous = get_shadow(session, stage)
    session.execute(delete(ModelShadow).where(ModelShadow.stage == _check_stage(stage)))
    return previous


def with_retries(fn: Callable[[], T], attempts: int = 10) -> T:
    """Run the transaction ``fn()`` again when a concurrent writer won (unique key, lock)."""
    for attempt in range(attempts):
        try:
            return fn()
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")
