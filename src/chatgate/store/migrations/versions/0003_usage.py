"""Usage accounting: one row per chat.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No foreign keys: a usage row outlives the model or user it names.
    op.create_table(
        "chatgate_usage",
        sa.Column("request_id", sa.Text(), primary_key=True),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("ttfb", sa.Float(), nullable=True),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("client_gone", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("idx_chatgate_usage_started_at", "chatgate_usage", ["started_at"])
    op.create_index("idx_chatgate_usage_model_started", "chatgate_usage", ["model_id", "started_at"])
    op.create_index("idx_chatgate_usage_user_started", "chatgate_usage", ["user_id", "started_at"])


def downgrade() -> None:
    op.drop_index("idx_chatgate_usage_user_started", table_name="chatgate_usage")
    op.drop_index("idx_chatgate_usage_model_started", table_name="chatgate_usage")
    op.drop_index("idx_chatgate_usage_started_at", table_name="chatgate_usage")
    op.drop_table("chatgate_usage")
