"""Heatmaps: each prediction may name its Grad-CAM picture, and the ``results`` view shows it.

A heatmap belongs to a prediction, not to an image: a new production model looks elsewhere.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 11:00:00
"""

import sqlalchemy as sa
from alembic import op

from db.views import results_view

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heatmap_path", sa.Text(), nullable=True))
    op.execute(results_view("0005"))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("heatmap_path")
    op.execute(results_view("0004"))
