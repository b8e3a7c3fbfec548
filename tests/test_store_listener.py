"""store/listener.py on a real PostgreSQL: token changes heard from the database, and a listener
that is not trusted while its connection is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import asyncpg
import pytest
import sqlalchemy as sa
from tests.support import services

from chatgate.accounts import Accounts, TokenCache
from chatgate.security.principal import Principal
from chatgate.security.tokens import token_hash
from chatgate.store import db
from chatgate.store.listener import APPLICATION_NAME, ChangeListener, confirm_wait

pytestmark = [pytest.mark.postgres, pytest.mark.backends("postgresql")]


async def _sql(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a connection of its own: another process's change, as far as chatgate knows."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def _terminate_listener(url: str) -> int:
    """Kill this process's listening backend the way an operator (or a failover) would."""
    rows = await _sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        f"{APPLICATION_NAME} {os.getpid()}",
    )
    return len(rows)


async def _until(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_a_change_to_tokens_or_users_by_any_connection_is_heard(migrated_database_url: str) -> None:
    async def go() -> list[str]:
        engine = db.create_engine(migrated_database_url)
        listener = ChangeListener(engine.url)
        heard: list[str] = []
        listener.start(lambda: heard.append("change"))
        try:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            assert heard == ["change"]  # the subscription itself: whatever was cached may be stale
            accounts = Accounts(engine)
            await accounts.add_user("u")
            info, _token = await accounts.create_token("u")
            await asyncio.sleep(0.2)
            assert heard == ["change"]  # inserts are not announced: nothing cached can be wrong
            # Revoked by another process's plain SQL: the trigger announces it, not chatgate's code.
            await _sql(migrated_database_url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE id = $1", info.id)
            await _until(lambda: len(heard) == 2)
            await _sql(migrated_database_url, "UPDATE chatgate_users SET is_admin = true")
            await _until(lambda: len(heard) == 3)
            # A rolled-back change is never announced.
            async with engine.connect() as conn:
                await conn.execute(sa.text("DELETE FROM chatgate_tokens"))
                await conn.rollback()
            await asyncio.sleep(0.2)
            return heard
        finally:
            await listener.aclose()
            await engine.dispose()

    assert asyncio.run(go()) == ["change"] * 3


def test_the_cache_is_not_trusted_while_the_listener_is_down_and_is_dropped_when_it_is_back(
    migrated_database_url: str,
) -> None:
    async def go() -> None:
        engine = db.create_engine(migrated_database_url)
        listener = ChangeListener(engine.url, reconnect_delay=1.5)
        cache = TokenCache(lambda: listener.listening)
        listener.start(cache.clear)
        accounts = Accounts(engine, cache=cache)
        try:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            await accounts.add_user("u")
            info, token = await accounts.create_token("u")
            assert await accounts.principal_for_token(token) is not None
            assert cache.get(token_hash(token)) is not None  # verified once, kept

            # The change goes unannounced (trigger off), as every change made while nobody
            # listens: the listener's backend is killed, then the token is revoked.
            await _sql(migrated_database_url, "ALTER TABLE chatgate_tokens DISABLE TRIGGER chatgate_tokens_notify")
            assert await _terminate_listener(migrated_database_url) == 1
            await _until(lambda: not listener.listening, timeout=1.0)  # at once, not at the next ping
            await _sql(migrated_database_url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE id = $1", info.id)
            assert cache.get(token_hash(token)) is None  # the kept answer is not served...
            assert await accounts.principal_for_token(token) is None  # ...the database is read
            await _sql(migrated_database_url, "UPDATE chatgate_tokens SET revoked_at = NULL WHERE id = $1", info.id)
            assert await accounts.principal_for_token(token) is not None
            assert cache.get(token_hash(token)) is None  # nor is anything kept meanwhile

            # Back: listening again, with everything kept before dropped.
            async with asyncio.timeout(10):
                await listener.wait_listening()
            assert cache.get(token_hash(token)) is None
        finally:
            await listener.aclose()
            await engine.dispose()

    asyncio.run(go())


def test_a_database_without_the_triggers_is_never_trusted(migrated_database_url: str) -> None:
    services.sql(migrated_database_url, "DROP TRIGGER chatgate_tokens_notify ON chatgate_tokens")

    async def go() -> bool:
        engine = db.create_engine(migrated_database_url)
        listener = ChangeListener(engine.url, reconnect_delay=0.1)
        listener.start(lambda: None)
        try:
            await asyncio.sleep(1.0)
            return listener.listening
        finally:
            await listener.aclose()
            await engine.dispose()

    assert asyncio.run(go()) is False


def test_a_revocation_on_this_instance_is_refused_at_once_and_an_answer_read_before_it_is_not_kept(
    migrated_database_url: str,
) -> None:
    async def go() -> None:
        engine = db.create_engine(migrated_database_url)
        listening = True
        cache = TokenCache(lambda: listening)
        accounts = Accounts(engine, cache=cache)
        try:
            await accounts.add_user("u")
            info, token = await accounts.create_token("u")
            assert await accounts.principal_for_token(token) is not None
            # No listener at all here: the revoking instance does not wait for the notification.
            await accounts.revoke(str(info.id))
            assert await accounts.principal_for_token(token) is None

            # A lookup that read the row before a change was heard must not keep its answer.
            _info, fresh = await accounts.create_token("u")
            digest = token_hash(fresh)
            before = cache.generation
            principal = await accounts.principal_for_token(fresh)
            assert principal is not None
            cache.clear()  # a change heard while the next lookup would be reading
            cache.put(digest, principal, before)
            assert cache.get(digest) is None
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_token_cache_serves_nothing_when_not_listening() -> None:
    listening = False
    cache = TokenCache(lambda: listening)
    principal = Principal(uuid.uuid4(), "u")
    cache.put("h", principal, cache.generation)
    assert cache.get("h") is None  # not kept either
    listening = True
    cache.put("h", principal, cache.generation)
    assert cache.get("h") == principal
    listening = False
    assert cache.get("h") is None


def test_a_revocation_returns_only_once_every_listening_instance_has_dropped_the_token(
    migrated_database_url: str,
) -> None:
    """The notification reaches a listener after the commit; the revoker (the CLI, another
    instance) waits for each listener's confirmation, so no next request can come before it."""

    async def go() -> None:
        engine = db.create_engine(migrated_database_url)
        listener = ChangeListener(engine.url)
        heard: list[int] = []
        listener.start(lambda: heard.append(1))
        accounts = Accounts(engine)  # the revoker keeps no cache, as the CLI
        try:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            await accounts.add_user("u")
            for _ in range(10):
                info, _token = await accounts.create_token("u")
                before = len(heard)
                await accounts.revoke(str(info.id))
                assert len(heard) == before + 1  # already applied when the revocation returns
        finally:
            await listener.aclose()
            await engine.dispose()

    asyncio.run(go())


def test_an_instance_that_does_not_confirm_is_named_and_the_revocation_stands(
    migrated_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> float:
        engine = db.create_engine(migrated_database_url)
        silent = await asyncpg.connect(
            migrated_database_url, server_settings={"application_name": f"{APPLICATION_NAME} 4242"}
        )
        await silent.add_listener("chatgate_tokens", lambda *_: None)  # hears, never confirms
        accounts = Accounts(engine)
        try:
            await accounts.add_user("u")
            info, token = await accounts.create_token("u")
            started = time.monotonic()
            await accounts.revoke(str(info.id))
            waited = time.monotonic() - started
            assert await accounts.principal_for_token(token) is None
            return waited
        finally:
            await silent.close()
            await engine.dispose()

    waited = asyncio.run(go())
    assert confirm_wait(5.0) <= waited < confirm_wait(5.0) + 2
    assert f"1 of 1 chatgate instances ({APPLICATION_NAME} 4242) did not confirm" in caplog.text


class _Cut:
    """A TCP relay to PostgreSQL that can go silent, as a network cut (or a hung server) looks:
    the connection stays open, nothing more arrives either way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.relays: list[asyncio.Task[object]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.silent:
                    dst.write(data)

        self.relays += [asyncio.ensure_future(pump(reader, up_writer)), asyncio.ensure_future(pump(up_reader, writer))]
        await asyncio.gather(*self.relays[-2:], return_exceptions=True)

    async def aclose(self) -> None:
        for writer in self.writers:
            writer.close()
        for relay in self.relays:
            relay.cancel()
        await asyncio.gather(*self.relays, return_exceptions=True)
        for writer in self.writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_a_silent_connection_is_distrusted_before_a_revocation_stops_waiting_for_it(migrated_database_url: str) -> None:
    """A cut that closes nothing: the listener hears no notification, sends no confirmation. The
    revocation waits `confirm_wait`; by then the cut instance no longer trusts its cache."""

    async def go() -> None:
        engine = db.create_engine(migrated_database_url)
        target = sa.make_url(migrated_database_url)
        cut = _Cut(target.port or 5432)
        port = await cut.start()
        listener = ChangeListener(db.async_url(migrated_database_url).set(port=port), reconnect_delay=30)
        accounts = Accounts(engine)  # the revoker, on a path that is not cut
        try:
            listener.start(lambda: None)
            async with asyncio.timeout(5):
                await listener.wait_listening()
            await accounts.add_user("u")
            info, _token = await accounts.create_token("u")
            await asyncio.sleep(0.6)  # a ping or two went through
            assert listener.listening
            cut.silent = True
            await accounts.revoke(str(info.id))  # waits for the cut listener, in vain
            assert not listener.listening
        finally:
            await listener.aclose()
            await cut.aclose()
            await engine.dispose()

    asyncio.run(go())
