"""Review flags: the input gate's score and what needs a person, on predictions and images.

A classified image's flag (``uncertain:<stage>``) and gate score belong to its prediction (a
property of the content and the model versions); an image the gate refused has no prediction,
so its ``out_of_scope`` and score are on the image. The ``results`` view shows either.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 03:15:00
"""

import sqlalchemy as sa
from alembic import op

from db.views import results_view

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TABLES = ("predictions", "images")


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("gate_score", sa.Float(), nullable=True))
            batch_op.add_column(sa.Column("review", sa.String(length=32), nullable=True))
    op.execute(results_view("0009"))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("review")
            batch_op.drop_column("gate_score")
    op.execute(results_view("0006"))
