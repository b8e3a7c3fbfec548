"""PostgreSQL `LISTEN`: hear, from the database itself, that tokens or users changed.

A trigger (migration 0006) sends `NOTIFY chatgate_tokens` in the transaction that revokes or
deletes a token or changes a user, whoever makes it: this instance, another one, the CLI, or
SQL typed by hand. `ChangeListener` holds one connection of its own (outside the pool) that
listens on that channel and calls `on_change` for each notification.

What the cache behind it may rely on is `listening`: True only while the subscription stands.
PostgreSQL delivers a notification only to sessions that were listening when it was sent, so
whatever happened while the connection was down is lost. On every (re)connection `on_change` is
called before `listening` turns True (everything cached before is dropped), and the moment the
connection is lost (asyncpg reports it as soon as the socket closes) `listening` turns False
and the cache is not trusted until the next subscription. A connection that goes silent (a hung
server, a network cut) closes nothing: the listener pings, and `listening` holds only while its
last answered ping was sent less than `confirm_wait` ago.

"The very next request", on every instance: a notification is asynchronous, and under load
the listening instance may hear it milliseconds after the revoking transaction has committed
(measured in docs/performance.md), while a client may already be asking it. So each listener
confirms on `chatgate_tokens_ack` once it has dropped its cache, and the revocation
(`confirmed_everywhere`, used by the API and the CLI alike) returns only when every instance
listening at its commit has confirmed: its next request, wherever it goes, is refused. An
instance that does not confirm within the timeout is named in a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chatgate.tasks import cancel_and_wait

__all__ = ["CHANNEL", "ChangeListener", "confirm_wait", "confirmed_everywhere"]

log = logging.getLogger("chatgate.store")

CHANNEL = "chatgate_tokens"  # the trigger of migration 0006 notifies here, with the transaction's id
ACK_CHANNEL = "chatgate_tokens_ack"  # each listener, once it has applied a change: "<that id> <its name>"
TRIGGERS = ("chatgate_tokens_notify", "chatgate_users_notify")
# How an operator (or a test) tells this connection apart in pg_stat_activity: "chatgate-listener <pid>".
APPLICATION_NAME = "chatgate-listener"


def confirm_wait(database_timeout: float) -> float:
    """Seconds a revocation waits for every instance's confirmation, and for which a listener's
    last answered ping vouches for its connection: the same span, so that when a revocation
    returns, an instance that did not confirm has stopped trusting its cache. Half the database
    step's deadline at most: the wait runs inside that step."""
    return min(2.0, database_timeout / 2)


class MissingTrigger(RuntimeError):
    """The database does not announce token changes (its schema is older than chatgate's)."""


class ChangeListener:
    """One listening connection, kept up in the background; `listening` says whether it stands."""

    def __init__(
        self,
        url: sa.URL,
        *,
        timeout: float = 5.0,
        reconnect_delay: float = 0.5,
    ) -> None:
        # asyncpg takes the libpq form of the URL; the password is only ever in this string.
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_change: Callable[[], None] = lambda: None
        self._timeout = timeout
        self._fresh_for = confirm_wait(timeout)
        self._ping_interval = self._fresh_for / 4
        self._fresh_until = 0.0  # monotonic time until which the last answered ping vouches
        self._reconnect_delay = reconnect_delay
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.name = f"{APPLICATION_NAME} {os.getpid()}"
        self._busy = asyncio.Lock()  # one statement at a time on the connection: pings and confirmations
        self._confirming: set[asyncio.Task[None]] = set()

    @property
    def listening(self) -> bool:
        """Whether every change committed from now on will reach `on_change`: subscribed, the
        connection open, and the server heard from lately (a hung server or a silent network
        cut is distrusted within `confirm_wait`, before a revocation stops waiting for us)."""
        return (
            self._listening.is_set()
            and time.monotonic() < self._fresh_until
            and self._conn is not None
            and not self._conn.is_closed()
        )

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
        self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout, command_timeout=self._timeout)
        self._conn.add_termination_listener(self._terminated)
        sent = time.monotonic()
        await self._conn.add_listener(CHANNEL, self._notified)
        # Without the triggers (migration 0006 not applied: CHATGATE_MIGRATE_ON_START=false)
        # nothing would ever be announced, and a cache trusting this listener would never forget.
        found = await self._conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = any($1::text[])", TRIGGERS)
        if found != len(TRIGGERS):
            raise MissingTrigger("the token-change triggers are missing: run `chatgate db upgrade`")
        # Named only now that it listens: a revocation waits for the confirmation of every
        # connection so named, and one still subscribing would never send it.
        await self._conn.execute(f"SET application_name = '{self.name}'")
        if self._conn.is_closed():
            raise ConnectionResetError("the listening connection closed while subscribing")
        # From here on no change can be missed; whatever was cached before may be stale.
        self._on_change()
        self._fresh_until = sent + self._fresh_for
        self._listening.set()

    async def _watch(self) -> None:
        """Return (by raising) when the connection is gone: at once when its socket closes,
        within `timeout` when the server stops answering (trust lapses sooner: `listening`)."""
        assert self._conn is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await self._lost.wait()
                    raise ConnectionResetError("the listening connection was closed")
            async with self._busy:
                # Timed from the send: the server answered after this, so any change it
                # committed before this was already notified on this connection.
                sent = time.monotonic()
                await self._conn.fetchval("SELECT 1", timeout=self._timeout)
                self._fresh_until = sent + self._fresh_for

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_change()
        task = asyncio.get_running_loop().create_task(self._confirm(payload))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm(self, payload: str) -> None:
        """Tell the revoking transaction's author that this instance has applied its change."""
        conn = self._conn
        if conn is None:
            return
        try:
            async with self._busy:
                await conn.execute(f"SELECT pg_notify('{ACK_CHANNEL}', $1)", f"{payload} {self.name}")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The watch loop sees the connection go; the revoker names this instance in its warning.
            log.debug("could not confirm a token change (%s: %s)", type(exc).__name__, exc)

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
        for task in list(self._confirming):
            task.cancel()
        await cancel_and_wait(self._task)
        self._task = None


# This transaction's id, and the instances listening now (by the name each listener takes).
_CHANGE = (
    "SELECT txid_current()::text, array(SELECT application_name FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name LIKE :name)"
)


@contextlib.asynccontextmanager
async def confirmed_everywhere(conn: AsyncConnection, within: float) -> AsyncIterator[None]:
    """Run the block in a transaction on `conn` (PostgreSQL); once it has committed, wait until
    every instance that was listening has applied the change (or `within` seconds have passed: a warning
    names the instances that did not confirm)."""
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    confirmed: set[str] = set()
    arrived = asyncio.Event()
    txid = ""

    def on_ack(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        change, _, name = payload.partition(" ")
        if change == txid:
            confirmed.add(name)
            arrived.set()

    # Subscribed before the change commits, so no confirmation can come before we listen.
    await raw.add_listener(ACK_CHANNEL, on_ack)
    try:
        async with conn.begin():
            # Named inside the transaction: an instance that starts listening after this is
            # notified too (it confirms, unasked); one that starts after the commit never had
            # the old state to forget (a subscription drops the whole cache).
            row = (await conn.execute(sa.text(_CHANGE), {"name": APPLICATION_NAME + " %"})).one()
            txid, listeners = row[0], set(row[1])
            yield
        try:
            async with asyncio.timeout(within):
                while not listeners <= confirmed:
                    arrived.clear()
                    await arrived.wait()
        except TimeoutError:
            missing = sorted(listeners - confirmed)
            log.warning(
                "%d of %d chatgate instances (%s) did not confirm a token change within %.1f s: "
                "they refuse the token once they hear of it",
                len(missing),
                len(listeners),
                ", ".join(missing),
                within,
            )
    finally:
        await raw.remove_listener(ACK_CHANNEL, on_ack)
