"""This database's deployment id (``db.models.Deployment``): made by migration 0006, or on
first use by a database created some other way."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Deployment, Image

ROW_ID = 1


def deployment_id(session: Session) -> str:
    """The id; the first caller on a database without one makes it (a racing second caller
    gets the winner's)."""
    row = session.get(Deployment, ROW_ID)
    if row is not None:
        return row.deployment_id
    try:
        with session.begin_nested():
            session.add(Deployment(id=ROW_ID, deployment_id=uuid.uuid4().hex))
    except IntegrityError:
        pass
    return session.get(Deployment, ROW_ID, populate_existing=True).deployment_id


def unknown_ids(session: Session, image_ids: list[int]) -> list[int]:
    """The ids among ``image_ids`` that this database holds no image for."""
    known = set(session.scalars(select(Image.id).where(Image.id.in_(image_ids))))
    return [i for i in image_ids if i not in known]
