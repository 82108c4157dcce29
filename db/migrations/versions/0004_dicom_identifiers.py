"""DICOM identifiers on each image and in the results view (never patient data).

Study, series and SOP instance UIDs, accession number, modality and view position, so a result
can be joined to the RIS/PACS worklist. Indexed where a worklist lookup starts: the study UID
and the accession number.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:00:00
"""

import sqlalchemy as sa
from alembic import op

from db.views import results_view

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number",
           "modality", "view_position")
INDEXED = ("study_instance_uid", "accession_number")


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("images", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.String(length=64), nullable=True))
        for name in INDEXED:
            batch_op.create_index(batch_op.f(f"ix_images_{name}"), [name], unique=False)
    op.execute(results_view("0004"))


def downgrade() -> None:
    # SQLite drops columns by copying the table, which the view on it must not watch.
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("images", schema=None) as batch_op:
        for name in reversed(INDEXED):
            batch_op.drop_index(batch_op.f(f"ix_images_{name}"))
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
    op.execute(results_view("0003"))
