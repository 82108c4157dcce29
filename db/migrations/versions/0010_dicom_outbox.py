"""The DICOM outbox: a row per result object (SR, heatmap SC) per destination, with its
attempts, last error and next try, so a PACS that is down costs a delay, never a result.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 03:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "kind", "destination", name="uq_dicom_outbox_item"),
    )
    with op.batch_alter_table("dicom_outbox") as batch:
        batch.create_index("ix_dicom_outbox_due", ["sent_at", "next_try_at"])


def downgrade() -> None:
    with op.batch_alter_table("dicom_outbox") as batch:
        batch.drop_index("ix_dicom_outbox_due")
    op.drop_table("dicom_outbox")
