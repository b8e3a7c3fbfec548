"""Failover: a model's fallbacks and balancing group, and what each chat's attempts did.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # chatgate's own table beside chatbot-ui's `models`, which is left as it is. A route goes
    # with either of its models: deleting a model deletes the routes to and from it.
    op.create_table(
        "chatgate_model_routes",
        sa.Column("model_id", sa.Uuid(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("target_id", sa.Uuid(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("model_id", "kind", "position"),
        sa.CheckConstraint("kind IN ('fallback', 'member')", name="ck_chatgate_model_routes_kind"),
        sa.CheckConstraint("weight >= 1", name="ck_chatgate_model_routes_weight"),
    )
    op.create_index("idx_chatgate_model_routes_target", "chatgate_model_routes", ["target_id"])
    with op.batch_alter_table("chatgate_usage") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("answered_model_id", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chatgate_usage") as batch:
        batch.drop_column("answered_model_id")
        batch.drop_column("attempts")
    op.drop_index("idx_chatgate_model_routes_target", table_name="chatgate_model_routes")
    op.drop_table("chatgate_model_routes")
