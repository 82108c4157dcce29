"""Ground truth: a ``labels`` table, one row per label given to an image.

A later label for the same image supersedes an earlier one, which stays (who said what, when):
the current label of an image is its newest row. Never a column of ``images`` or ``results``,
so the model's answer and the truth cannot be confused.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("labelled_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_labels_image_id"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_labels_image_id", "labels", ["image_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_labels_image_id", table_name="labels")
    op.drop_table("labels")
