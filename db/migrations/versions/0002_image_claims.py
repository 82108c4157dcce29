"""Who holds an image in ``processing`` and since when: a lease for batched workers.

A delivery that finds its image held by another live worker waits for it instead of
classifying the image a second time; a holder that died or outlived the lease is taken over.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 02:00:00
"""

import sqlalchemy as sa
from alembic import op

from db.models import RESULTS_VIEW_SQL_0001

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops columns by copying the table, which the view on it must not watch.
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("claimed_by")
    op.execute(RESULTS_VIEW_SQL_0001)
