"""The feedback store: models, predictions, feedback, disputes, tally, spool offsets (issue 23).

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

IDENT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("model", sa.String(128), nullable=False), sa.Column("version", sa.String(64), nullable=False),
        sa.Column("classes", sa.Text(), nullable=False), sa.Column("first_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", "version", name="pk_models"))
    op.create_table(
        "predictions",
        sa.Column("id", IDENT, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False), sa.Column("version", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False), sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("label", sa.String(256), nullable=False), sa.Column("class_index", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False), sa.Column("uncertain", sa.Boolean(), nullable=False),
        sa.Column("ood", sa.Boolean(), nullable=False), sa.Column("ood_score", sa.Float(), nullable=True),
        sa.Column("tta_views", sa.Integer(), nullable=False), sa.Column("flag", sa.String(32), nullable=False),
        sa.Column("review", sa.Boolean(), nullable=False),
        sa.Column("input_shape", sa.String(32), nullable=False), sa.Column("input", sa.LargeBinary(), nullable=False),
        sa.Column("upload", sa.LargeBinary(), nullable=True),
        sa.Column("tallied", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("model", "request_id", "item", "version", name="uq_predictions_answer"))
    op.create_index("ix_predictions_time", "predictions", ["time"])
    op.create_index("ix_predictions_review", "predictions", ["model", "review", "time"])
    op.create_table(
        "feedback",
        sa.Column("id", IDENT, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False), sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False), sa.Column("label", sa.String(256), nullable=False),
        sa.Column("class_index", sa.Integer(), nullable=True), sa.Column("time", sa.Float(), nullable=False),
        sa.UniqueConstraint("model", "request_id", "item", name="uq_feedback_answer"))
    op.create_table(
        "disputes",
        sa.Column("id", IDENT, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False), sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False), sa.Column("label", sa.String(256), nullable=False),
        sa.Column("standing", sa.String(256), nullable=False), sa.Column("time", sa.Float(), nullable=False))
    op.create_index("ix_disputes_answer", "disputes", ["model", "request_id", "item"])
    op.create_table(
        "tally",
        sa.Column("model", sa.String(128), nullable=False), sa.Column("version", sa.String(64), nullable=False),
        sa.Column("flag", sa.String(32), nullable=False), sa.Column("label", sa.String(256), nullable=False),
        sa.Column("labelled", sa.BigInteger(), nullable=False), sa.Column("correct", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "version", "flag", "label", name="pk_tally"))
    op.create_table(
        "spool_offsets",
        sa.Column("segment", sa.String(512), primary_key=True), sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False))


def downgrade() -> None:
    for table in ("spool_offsets", "tally", "disputes", "feedback", "predictions", "models"):
        op.drop_table(table)
