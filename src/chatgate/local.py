"""The database as a CLI command opens it: for the length of one action, as it is.

Only `chatgate serve` and `chatgate db upgrade` migrate, and only `serve` creates the first admin:
every other command finds the database there, with chatgate's current schema, or says how to
start, without creating a file, a table, a key or a user.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import Accounts
from chatgate.cachebus import CacheBus
from chatgate.config import Settings
from chatgate.errors import ChatgateError
from chatgate.registry import Registry
from chatgate.runtime import build_registry, connect_redis
from chatgate.security.crypto import KeyRing
from chatgate.security.keys import Keys
from chatgate.store import db

T = TypeVar("T")


@dataclass
class Local:
    """The database, opened by a CLI command for the length of one action."""

    settings: Settings
    engine: AsyncEngine
    keys: Keys
    bus: CacheBus | None = None

    @property
    def registry(self) -> Registry:
        # With Redis, running servers hear of the change at once (else within their cache TTL).
        return build_registry(self.settings, self.engine, self.keys, self.bus.publish if self.bus else None)

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.engine)


class NoDatabase(ChatgateError):
    """The command needs a database that `chatgate serve` or `chatgate db upgrade` makes."""


_START_HINT = "start the server with `chatgate serve` (it creates one) or run `chatgate db upgrade`"


async def schema_ready(engine: AsyncEngine, shown: str) -> None:
    """Refuse a database without chatgate's tables, or with an older schema, without changing it."""

    def revisions(conn: sa.Connection) -> tuple[str | None, str | None]:
        current = MigrationContext.configure(conn).get_current_revision()
        head = ScriptDirectory(str(resources.files("chatgate.store") / "migrations")).get_current_head()
        return current, head

    async with engine.connect() as conn:
        current, head = await conn.run_sync(revisions)
    if current is None:
        raise NoDatabase(f"the database {shown} has no chatgate tables yet: {_START_HINT}")
    if current != head:
        raise NoDatabase(f"the database {shown} needs an upgrade: run `chatgate db upgrade`")


def _keys(settings: Settings, *, writes: bool) -> Keys:
    """The key ring; a read-only command does not create a missing key file (with none, no stored
    key was encrypted by this installation: a throwaway ring stands in and decrypts nothing)."""
    secret = settings.secret_key.get_secret_value()
    if secret or writes or (settings.data_dir / "chatgate.key").exists():
        return Keys.from_settings(settings)
    return Keys(KeyRing(secrets.token_bytes(32)), encrypt_writes=settings.encrypt_api_keys)


async def run_local(settings: Settings, action: Callable[[Local], Awaitable[T]], *, writes: bool = False) -> T:
    """Run `action` on the existing database. Only `serve` and `db upgrade` migrate, only `serve`
    creates the first admin: a command never surprises with a new database or user."""
    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    path = db.sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        raise NoDatabase(f"no database at {path}: {_START_HINT}")
    engine = db.create_engine(settings.database_url)
    redis = connect_redis(settings) if settings.redis_url and writes else None
    try:
        await schema_ready(engine, shown)
        bus = CacheBus(redis, prefix=settings.redis_prefix) if redis is not None else None
        local = Local(settings, engine, _keys(settings, writes=writes), bus)
        return await action(local)
    finally:
        if redis is not None:
            await redis.aclose()
        await engine.dispose()
