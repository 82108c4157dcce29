"""This database's identity: a random deployment id, made once, that every message carries.

Two deployments may share one Redis (and a queue name); a worker tells its own messages from
the other's by this id. Random rather than a hash of the database URL: the watcher, the workers
and the CLI reach one database by different URLs (host names, ports, users), and a moved or
restored database keeps its identity.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 02:40:00
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "deployment_id": uuid.uuid4().hex,
                            "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("deployment")
