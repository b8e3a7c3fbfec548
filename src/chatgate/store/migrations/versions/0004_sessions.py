"""Console sessions: a cookie's id (as its sha256) tied to the API token that opened it.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chatgate_sessions",
        sa.Column("id_hash", sa.Text(), primary_key=True),
        sa.Column("token_id", sa.Uuid(), sa.ForeignKey("chatgate_tokens.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("idx_chatgate_sessions_token_id", "chatgate_sessions", ["token_id"])
    op.create_index("idx_chatgate_sessions_expires_at", "chatgate_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("idx_chatgate_sessions_expires_at", table_name="chatgate_sessions")
    op.drop_index("idx_chatgate_sessions_token_id", table_name="chatgate_sessions")
    op.drop_table("chatgate_sessions")
