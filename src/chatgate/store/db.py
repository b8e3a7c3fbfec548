"""The database: one async engine per process, created in the lifespan, and its migrations."""

from __future__ import annotations

import asyncio
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
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
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
    """An `AsyncConnection` whose connection-level failures become `ServiceUnavailable`, and
    whose whole block shares one deadline.

    The one place where database outages are mapped: every `async with engine.connect()` or
    `engine.begin()` block passes through `__aenter__`/`__aexit__`, so a failure while connecting,
    inside the block or at commit is raised as a 503, and any other error as it is.

    The deadline (the engine's `step_timeout`, PostgreSQL only) covers the checkout with its
    pre-ping and any reconnect, the statements and the commit together. Per-step timeouts alone
    add up: a hung server cost a ping timeout, then a connect timeout (2 x CHATGATE_DATABASE_TIMEOUT
    before the 503). A connection cut by the deadline is dropped without the rollback a hung
    server would not answer either."""

    _deadline: asyncio.Timeout | None = None

    async def __aenter__(self) -> AsyncConnection:
        budget = getattr(self.engine, "step_timeout", None)
        if budget is not None:
            self._deadline = asyncio.timeout(budget)
            await self._deadline.__aenter__()
        try:
            return await super().__aenter__()
        except BaseException as exc:
            failure = await self._leave_deadline(exc) or exc
            if isinstance(failure, Exception) and is_unavailable(failure):
                raise _unavailable(failure) from failure
            raise

    async def __aexit__(
        self, type_: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # asyncpg's terminate() closes the socket at once; SQLAlchemy's cleanup (a rollback, its
        # graceful close) would wait for a hung server, and runs to the end even when cancelled.
        terminate = getattr(self._driver_connection(), "terminate", None)
        drop: asyncio.TimerHandle | None = None
        if self._deadline is not None and terminate is not None:
            if self._deadline.expired():
                terminate()
            elif (when := self._deadline.when()) is not None:
                drop = asyncio.get_running_loop().call_at(when, terminate)
        cleanup: BaseException | None = None
        try:
            await super().__aexit__(type_, value, traceback)
        except BaseException as exc:  # noqa: BLE001 - raised below, once the deadline is left
            cleanup = exc
        finally:
            if drop is not None:
                drop.cancel()
        # The block's failure is the one to report: closing after it may have failed too.
        failure = await self._leave_deadline(value or cleanup) or value or cleanup
        if failure is None:
            return
        if isinstance(failure, Exception) and is_unavailable(failure):
            raise _unavailable(failure) from failure
        if failure is not value:
            raise failure
        # Any other failure of the block propagates as it is.

    async def _leave_deadline(self, exc: BaseException | None) -> TimeoutError | None:
        """Leave the deadline; a TimeoutError when it cut the block (the cancellation it caused
        is consumed then), else None."""
        deadline, self._deadline = self._deadline, None
        if deadline is None:
            return None
        try:
            await deadline.__aexit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None)
        except TimeoutError as timed_out:
            return timed_out
        return None

    def _driver_connection(self) -> Any:
        """The driver's connection under this block, or None when it has none (any more)."""
        connection = self.sync_connection
        if connection is None or connection.closed or connection.invalidated:
            return None
        return connection.connection.driver_connection


class _Asyncpg(PGDialect_asyncpg):
    """SQLAlchemy's asyncpg dialect, except that a connection the pool drops (invalidated: a
    failed ping, a statement cut by the deadline) has its socket closed at once. SQLAlchemy first
    tries a graceful close, which waits up to 2 s for a hung server (measured: the first 503
    after a freeze came after 2 timeouts instead of 1)."""

    supports_statement_cache = True

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.driver_connection.terminate()


registry.register("postgresql.chatgate_asyncpg", __name__, "_Asyncpg")


class GuardedEngine(AsyncEngine):
    """The engine chatgate uses: an `AsyncEngine` that hands out `GuardedConnection`s, each
    block bounded by `step_timeout` seconds when it is set."""

    __slots__ = ("step_timeout",)
    _connection_cls = GuardedConnection

    def __init__(self, sync_engine: sa.Engine, step_timeout: float | None = None) -> None:
        super().__init__(sync_engine)
        self.step_timeout = step_timeout


def create_engine(url: str, *, timeout: float = 5.0, pool_size: int = 10) -> AsyncEngine:
    """An async engine with a pool suited to the backend.

    On PostgreSQL each `connect()`/`begin()` block is bounded by `timeout` seconds as a whole
    (waiting for a pooled connection, the pre-ping, connecting, the statements), so an
    unreachable or hung server is a 503 within one timeout, never a hang; the pre-ping replaces
    pooled connections that a database restart killed."""
    target = async_url(url)
    kwargs: dict[str, Any] = {}
    postgres = target.get_backend_name() == "postgresql"
    if target.drivername == "postgresql+asyncpg":
        target = target.set(drivername="postgresql+chatgate_asyncpg")
    if postgres:
        kwargs.update(
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_timeout=timeout,
            # Also bounded here, for work outside a guarded block (migrations' run_sync).
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
    return GuardedEngine(engine.sync_engine, timeout if postgres else None)


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
    # Without the per-block deadline: a migration, or waiting for another instance's, may take
    # longer than one request's database step (each statement keeps the driver's timeout).
    async with GuardedEngine(engine.sync_engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            # Instances starting together migrate one after the other; the later ones find nothing to do.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        await conn.run_sync(_upgrade)
