"""Ground truth: the labels a radiologist, a report or an import gave an image.

Every label is a new row; the newest row of an image is its current label and the earlier
ones stay as history. ``current_labels`` is what measuring a model against the truth reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.exceptions import LabelError
from db.models import GroundTruth, Image
from db.vocabulary import LABEL_SOURCES, Label

SOURCES = LABEL_SOURCES

MATCH_KEYS = ("id", "sha256", "sop_instance_uid", "accession_number")
"""Columns an import may match images by; a sha256 or an accession number may match several."""

EXPORT_COLUMNS = ("id", "sha256", "sop_instance_uid", "accession_number", "label", "source",
                  "labelled_by", "created_at")


def check_label(label: str, source: str, by: str) -> tuple[str, str, str]:
    """(label, source, by) normalised, or LabelError saying what is wrong."""
    value = (label or "").strip().upper()
    if value not in {item.value for item in Label}:
        raise LabelError(f"unknown label {label!r}: one of {', '.join(Label)}")
    if source not in SOURCES:
        raise LabelError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    who = (by or "").strip()
    if not who or len(who) > 255:
        raise LabelError("a label needs who gave it (--by NAME, at most 255 characters)")
    return value, source, who


def add_label(session: Session, image_id: int, label: str, source: str, by: str) -> int:
    """Record ``label`` as image ``image_id``'s truth (superseding earlier ones); the row id."""
    value, source, who = check_label(label, source, by)
    if session.get(Image, int(image_id)) is None:
        raise LabelError(f"no image with id {image_id}")
    row = GroundTruth(image_id=int(image_id), label=value, source=source, labelled_by=who)
    session.add(row)
    session.flush()
    return row.id


def add_labels(session: Session, items: Iterable[tuple[int, str]], source: str, by: str) -> int:
    """Many (image id, label) pairs of one source and person, in this transaction; how many."""
    rows = []
    for image_id, label in items:
        value, source, who = check_label(label, source, by)
        rows.append(GroundTruth(image_id=int(image_id), label=value, source=source,
                                labelled_by=who))
    session.add_all(rows)
    session.flush()
    return len(rows)


def _newest_ids():
    return select(func.max(GroundTruth.id)).group_by(GroundTruth.image_id)


def current_labels(session: Session, image_ids: Iterable[int] | None = None) -> dict[int, str]:
    """image id -> its newest label, for ``image_ids`` (all labelled images when None)."""
    query = select(GroundTruth.image_id, GroundTruth.label).where(
        GroundTruth.id.in_(_newest_ids()))
    if image_ids is None:
        return {int(i): label for i, label in session.execute(query)}
    wanted = sorted({int(i) for i in image_ids})
    out: dict[int, str] = {}
    for start in range(0, len(wanted), 1000):  # bounded IN lists
        chunk = query.where(GroundTruth.image_id.in_(wanted[start:start + 1000]))
        out.update({int(i): label for i, label in session.execute(chunk)})
    return out


def match_images(session: Session, key: str, values: Iterable[str]) -> dict[str, list[int]]:
    """value -> the ids of the images whose ``key`` column holds it (absent: no match)."""
    if key not in MATCH_KEYS:
        raise LabelError(f"cannot match images by {key!r}: one of {', '.join(MATCH_KEYS)}")
    column = getattr(Image, key)
    wanted = sorted({v.strip() for v in values if v and v.strip()})
    if key == "id":
        wanted = [v for v in wanted if v.isdigit()]
    out: dict[str, list[int]] = {}
    for start in range(0, len(wanted), 1000):
        chunk = wanted[start:start + 1000]
        params = [int(v) for v in chunk] if key == "id" else chunk
        for image_id, value in session.execute(select(Image.id, column).where(
                column.in_(params)).order_by(Image.id)):
            out.setdefault(str(value), []).append(int(image_id))
    return out


def export_labels(session: Session, *, history: bool = False) -> list[dict[str, Any]]:
    """Current labels (every label with ``history``) with the image keys an import matches."""
    query = (select(GroundTruth, Image.sha256, Image.sop_instance_uid, Image.accession_number)
             .join(Image, Image.id == GroundTruth.image_id).order_by(GroundTruth.id))
    if not history:
        query = query.where(GroundTruth.id.in_(_newest_ids()))
    return [_export_row(label, sha, sop, accession)
            for label, sha, sop, accession in session.execute(query)]


def _export_row(row: GroundTruth, sha256: str, sop: str | None, accession: str | None
                ) -> dict[str, Any]:
    created: datetime = row.created_at
    return {"id": row.image_id, "sha256": sha256, "sop_instance_uid": sop,
            "accession_number": accession, "label": row.label, "source": row.source,
            "labelled_by": row.labelled_by, "created_at": created.isoformat()}
