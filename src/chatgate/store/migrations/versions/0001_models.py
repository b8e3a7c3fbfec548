"""The models registry, with chatbot-ui's columns and limits.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

LIMITS = {"api_key": 1000, "base_url": 1000, "description": 500, "model_id": 1000, "name": 100}


def upgrade() -> None:
    # A chatbot-ui database already has this table; it is used as it is, never rewritten.
    if sa.inspect(op.get_bind()).has_table("models"):
        return
    op.create_table(
        "models",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("folder_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sharing", sa.Text(), nullable=False, server_default="private"),
        sa.Column("api_key", sa.Text(), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False, server_default="4096"),
        *(sa.CheckConstraint(f"length({c}) <= {n}", name=f"models_{c}_length") for c, n in LIMITS.items()),
        sa.CheckConstraint("sharing IN ('private', 'public', 'unlisted')", name="models_sharing_values"),
    )
    op.create_index("idx_models_user_id", "models", ["user_id"])


def downgrade() -> None:
    op.drop_index("idx_models_user_id", table_name="models")
    op.drop_table("models")
