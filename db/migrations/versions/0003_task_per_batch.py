"""Which task classified an image: one message now carries a batch of images.

Flower shows one task per batch; each image's row names the task (``task_id``), and the
``results`` view shows it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00
"""

import sqlalchemy as sa
from alembic import op

from db.views import results_view

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("task_id", sa.String(length=64), nullable=True))
    op.execute(results_view("0003"))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("task_id")
    op.execute(results_view("0002"))
