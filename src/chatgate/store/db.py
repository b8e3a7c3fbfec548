"""The database: one async engine per process, created in the lifespan, and its migrations."""

from __future__ import annotations

from importlib import resources
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def async_url(url: str) -> sa.URL:
    """Map the user-facing URL (`sqlite:///…`, `postgresql://…`) to its async driver."""
    parsed = make_url(url)
    drivers = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
    }
    backend = parsed.get_backend_name()
    if parsed.drivername in drivers:
        return parsed.set(drivername=drivers[parsed.drivername])
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database URL scheme {parsed.drivername!r} (use sqlite or postgresql)")
    return parsed


def create_engine(url: str) -> AsyncEngine:
    """An async engine with a pool suited to the backend."""
    target = async_url(url)
    kwargs: dict[str, Any] = {}
    if target.get_backend_name() == "postgresql":
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True, pool_timeout=5)
    else:
        kwargs.update(connect_args={"timeout": 15})
    engine = create_async_engine(target, **kwargs)
    if target.get_backend_name() == "sqlite":
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the server read while the CLI writes; NORMAL is durable enough under WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("chatgate.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: sa.Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def _pending(connection: sa.Connection) -> list[str]:
    script = ScriptDirectory.from_config(_alembic_config(connection))
    current = set(MigrationContext.configure(connection).get_current_heads())
    return [rev.revision for rev in script.walk_revisions() if rev.revision not in current][::-1]


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration, in one transaction where the backend allows it."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def pending_migrations(conn: AsyncConnection) -> list[str]:
    return await conn.run_sync(_pending)
