"""Safe rollout: a shadow version per stage, every prediction an image has had (with its
role), an audit trail of registry changes, and resumable re-score jobs.

The ``results`` view is unchanged: it still shows ``images.prediction_id``, the production
(or newest re-scored) prediction; shadows only ever appear in ``image_predictions``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 03:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_shadows",
        sa.Column("stage", sa.String(length=20), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("started_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("stage"),
    )
    op.create_table(
        "image_predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("prediction_id", sa.Integer(), sa.ForeignKey("predictions.id"),
                  nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "prediction_id", "role", name="uq_image_predictions"),
    )
    op.create_index("ix_image_predictions_image_id", "image_predictions", ["image_id"])
    op.create_index("ix_image_predictions_prediction_id", "image_predictions",
                    ["prediction_id"])
    # what images already show was made by production: history starts complete
    op.execute(
        "INSERT INTO image_predictions (image_id, prediction_id, role, created_at) "
        "SELECT id, prediction_id, 'production', COALESCE(finished_at, received_at) "
        "FROM images WHERE prediction_id IS NOT NULL"
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=20), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "rescore_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("pneumonia_model_id", sa.Integer(), sa.ForeignKey("model_versions.id"),
                  nullable=False),
        sa.Column("infection_model_id", sa.Integer(), sa.ForeignKey("model_versions.id"),
                  nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cursor", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.JSON(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("finished_at", WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("rescore_jobs")
    op.drop_table("audit")
    op.drop_index("ix_image_predictions_prediction_id", table_name="image_predictions")
    op.drop_index("ix_image_predictions_image_id", table_name="image_predictions")
    op.drop_table("image_predictions")
    op.drop_table("model_shadows")
