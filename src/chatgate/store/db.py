"""The database: one async engine per process, created in the lifespan, and its migrations."""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chatgate.errors import ServiceUnavailable

log = logging.getLogger("chatgate.store")

UNAVAILABLE = "The database is unavailable; try again shortly"
# SQLSTATEs that mean "the server cannot serve this connection now", not "your query is wrong":
# connection exceptions (class 08), admin/crash shutdown, starting up, too many connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o")
_MIGRATION_LOCK = 0x63686174676174  # "chatgat": a PostgreSQL advisory lock key of chatgate's own


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


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or cannot serve now (a 503), as opposed
    to a statement it refused (a bug, or a constraint the caller maps itself)."""
    if isinstance(exc, sa.exc.DBAPIError):
        if type(exc.orig).__module__.startswith("sqlite3"):
            # SQLite says OperationalError for "no such table" too; only these mean "not now".
            return any(s in str(exc.orig).lower() for s in _SQLITE_UNAVAILABLE)
        if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(state, str) and state.startswith(_UNAVAILABLE_SQLSTATES)
    # A pool checkout timeout; and what asyncpg raises untranslated: refused or reset sockets,
    # connect and statement timeouts (TimeoutError is an OSError).
    return isinstance(exc, sa.exc.TimeoutError | OSError)


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    detail = str(exc).strip().splitlines()
    log.warning("database unavailable: %s: %s", type(exc).__name__, detail[0] if detail else "")
    return ServiceUnavailable(UNAVAILABLE)


class GuardedConnection(AsyncConnection):
    """An `AsyncConnection` whose connection-level failures become `ServiceUnavailable`.

    The one place where database outages are mapped: every `async with engine.connect()` or
    `engine.begin()` block passes through `__aenter__`/`__aexit__`, so a failure while connecting,
    inside the block or at commit is raised as a 503, and any other error as it is."""

    async def __aenter__(self) -> AsyncConnection:
        try:
            return await super().__aenter__()
        except Exception as exc:
            if is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    async def __aexit__(
        self, type_: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            await super().__aexit__(type_, value, traceback)
        except Exception as exc:
            if value is not None:
                pass  # closing after a failure failed too: the first failure is the one to report
            elif is_unavailable(exc):
                raise _unavailable(exc) from exc
            else:
                raise
        if value is not None and is_unavailable(value):
            raise _unavailable(value) from value


class GuardedEngine(AsyncEngine):
    """The engine chatgate uses: an `AsyncEngine` that hands out `GuardedConnection`s."""

    __slots__ = ()
    _connection_cls = GuardedConnection


def create_engine(url: str, *, timeout: float = 5.0, pool_size: int = 10) -> AsyncEngine:
    """An async engine with a pool suited to the backend.

    On PostgreSQL each step is bounded by `timeout` seconds (waiting for a pooled connection,
    connecting, each statement), so an unreachable or hung server is a 503, never a hang; the
    pre-ping replaces pooled connections that a database restart killed."""
    target = async_url(url)
    kwargs: dict[str, Any] = {}
    if target.get_backend_name() == "postgresql":
        kwargs.update(
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_timeout=timeout,
            connect_args={"timeout": timeout, "command_timeout": timeout},
        )
    else:
        kwargs.update(connect_args={"timeout": 15})
    # hide_parameters: a failed statement must never print an API key (or its sealed form) in a log.
    engine = create_async_engine(target, hide_parameters=True, **kwargs)
    if target.get_backend_name() == "sqlite":
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        path = sqlite_path(url)
        if path is not None:
            sa.event.listen(engine.sync_engine, "do_connect", lambda *_: _create_private(path))
    return GuardedEngine(engine.sync_engine)


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names; None for another backend, an in-memory database or a URI filename."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _create_private(path: Path) -> None:
    # The database holds token hashes and API keys: create it owner-only (0600), like the key
    # file, before SQLite creates it with the umask's mode. Its -wal and -shm files take the
    # database file's mode. An existing file is left as it is.
    # There already, or no such directory (which SQLite reports in its own words): nothing to do.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


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


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration, in one transaction where the backend allows it."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Instances starting together migrate one after the other; the later ones find nothing to do.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        await conn.run_sync(_upgrade)
