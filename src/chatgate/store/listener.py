"""PostgreSQL `LISTEN`: hear, from the database itself, that tokens or users changed.

A trigger (migration 0006) sends `NOTIFY chatgate_tokens` in the transaction that revokes or
deletes a token or changes a user, whoever makes it: this instance, another one, the CLI, or
SQL typed by hand. `ChangeListener` holds one connection of its own (outside the pool) that
listens on that channel and calls `on_change` for each notification.

What the cache behind it may rely on is `listening`: True only while the subscription stands.
PostgreSQL delivers a notification only to sessions that were listening when it was sent, so
whatever happened while the connection was down is lost. On every (re)connection `on_change` is
called before `listening` turns True (everything cached before is dropped), and the moment the
connection is lost (asyncpg reports it as soon as the socket closes; a periodic ping catches a
silent one) `listening` turns False and the cache is not trusted until the next subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import asyncpg
import sqlalchemy as sa

__all__ = ["CHANNEL", "ChangeListener"]

log = logging.getLogger("chatgate.store")

CHANNEL = "chatgate_tokens"  # the trigger of migration 0006 notifies here
TRIGGERS = ("chatgate_tokens_notify", "chatgate_users_notify")
# How an operator (or a test) tells this connection apart in pg_stat_activity: "chatgate-listener <pid>".
APPLICATION_NAME = "chatgate-listener"


class MissingTrigger(RuntimeError):
    """The database does not announce token changes (its schema is older than chatgate's)."""


class ChangeListener:
    """One listening connection, kept up in the background; `listening` says whether it stands."""

    def __init__(
        self,
        url: sa.URL,
        *,
        timeout: float = 5.0,
        ping_interval: float = 5.0,
        reconnect_delay: float = 0.5,
    ) -> None:
        # asyncpg takes the libpq form of the URL; the password is only ever in this string.
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_change: Callable[[], None] = lambda: None
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._reconnect_delay = reconnect_delay
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """Whether every change committed from now on will reach `on_change`."""
        return self._listening.is_set() and self._conn is not None and not self._conn.is_closed()

    def start(self, on_change: Callable[[], None]) -> None:
        """Listen in the background, calling `on_change()` for each change (and on each subscription)."""
        self._on_change = on_change
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chatgate-listener")

    async def wait_listening(self) -> None:
        """Wait until the subscription stands (bound it with `asyncio.timeout`)."""
        await self._listening.wait()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self._listen()
                if failing:
                    log.warning("listening for token changes again: verified tokens are cached again")
                    failing = False
                await self._watch()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, MissingTrigger) as exc:
                if not failing:
                    log.warning(
                        "not listening for token changes (%s: %s); until it is back every request's "
                        "token is read from the database",
                        type(exc).__name__,
                        exc,
                    )
                    failing = True
            finally:
                self._down()
                await self._close()
            await asyncio.sleep(self._reconnect_delay)

    async def _listen(self) -> None:
        self._lost.clear()
        self._conn = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings={"application_name": f"{APPLICATION_NAME} {os.getpid()}"},
        )
        self._conn.add_termination_listener(self._terminated)
        await self._conn.add_listener(CHANNEL, self._notified)
        # Without the triggers (migration 0006 not applied: CHATGATE_MIGRATE_ON_START=false)
        # nothing would ever be announced, and a cache trusting this listener would never forget.
        found = await self._conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = any($1::text[])", TRIGGERS)
        if found != len(TRIGGERS):
            raise MissingTrigger("the token-change triggers are missing: run `chatgate db upgrade`")
        if self._conn.is_closed():
            raise ConnectionResetError("the listening connection closed while subscribing")
        # From here on no change can be missed; whatever was cached before may be stale.
        self._on_change()
        self._listening.set()

    async def _watch(self) -> None:
        """Return (by raising) when the connection is gone: at once when its socket closes,
        within `ping_interval` + `timeout` when the server stops answering."""
        assert self._conn is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await self._lost.wait()
                    raise ConnectionResetError("the listening connection was closed")
            await self._conn.fetchval("SELECT 1", timeout=self._timeout)

    def _notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._on_change()

    def _terminated(self, _conn: Any) -> None:
        # Called by asyncpg as soon as the connection is lost: stop trusting the cache now,
        # not when the watch loop next wakes up.
        self._down()
        self._lost.set()

    def _down(self) -> None:
        self._listening.clear()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
