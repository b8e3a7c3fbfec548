"""The tables as SQLAlchemy Core metadata: how code reads them. The migrations create them.

`models` keeps chatbot-ui's columns and limits so that chatgate can use a chatbot-ui table as it is.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

models = sa.Table(
    "models",
    metadata,
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
)

# chatgate's own tables carry a prefix: in a chatbot-ui (Supabase) database they sit beside its tables.
users = sa.Table(
    "chatgate_users",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.Text(), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

tokens = sa.Table(
    "chatgate_tokens",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("user_id", sa.Uuid(), sa.ForeignKey("chatgate_users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_hash", sa.Text(), nullable=False, unique=True),
    sa.Column("prefix", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

# One row per chat (usage accounting); times in seconds, tokens NULL when the upstream did not say.
usage = sa.Table(
    "chatgate_usage",
    metadata,
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
    sa.Column("bytes_out", sa.BigInteger(), nullable=False),
    sa.Column("client_gone", sa.Boolean(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    # Upstream requests the chat made (retries and fallbacks included), and the model that answered.
    sa.Column("attempts", sa.Integer(), nullable=True),
    sa.Column("answered_model_id", sa.Uuid(), nullable=True),
)

# Console sessions (security/sessions.py): the cookie's id only as a hash; a session ends with its token.
sessions = sa.Table(
    "chatgate_sessions",
    metadata,
    sa.Column("id_hash", sa.Text(), primary_key=True),
    sa.Column("token_id", sa.Uuid(), sa.ForeignKey("chatgate_tokens.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

# A model's fallbacks (tried in `position` order when it fails) and its balancing group
# (`member`s sharing its traffic by `weight`): chatgate's own table, chatbot-ui's `models` unchanged.
model_routes = sa.Table(
    "chatgate_model_routes",
    metadata,
    sa.Column("model_id", sa.Uuid(), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.Text(), primary_key=True),
    sa.Column("position", sa.Integer(), primary_key=True),
    sa.Column("target_id", sa.Uuid(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
)
