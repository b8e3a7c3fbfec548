"""PostgreSQL: announce every change to tokens and users on the `chatgate_tokens` channel.

Each server instance keeps the tokens it has verified in memory and drops them when this
notification arrives (`store/listener.py`). A trigger, not the application, sends it: the
notification is part of the same transaction as the change, whoever makes it (the API, the
CLI, or SQL typed by hand), and is delivered only if that transaction commits. INSERT is not
announced: a new token was never cached as anything.

SQLite needs nothing: every process sees another's commit through `PRAGMA data_version`.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CHANNEL = "chatgate_tokens"
_TABLES = ("chatgate_tokens", "chatgate_users")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION chatgate_notify_tokens() RETURNS trigger LANGUAGE plpgsql AS $$ "
        # The transaction's id: each listener confirms it (`store/listener.py`), so the author of
        # the change knows when every instance has applied it.
        f"BEGIN PERFORM pg_notify('{CHANNEL}', txid_current()::text); RETURN NULL; END $$"
    )
    for table in _TABLES:
        # Per statement: a bulk revocation is one notification, not one per row (and PostgreSQL
        # folds identical notifications of one transaction into one anyway).
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION chatgate_notify_tokens()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify ON {table}")
    op.execute("DROP FUNCTION IF EXISTS chatgate_notify_tokens()")
