"""store/listener.py on a real PostgreSQL: token changes heard from the database, and a listener
that is not trusted while its connection is down."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
import sqlalchemy as sa
from tests.support import services

from chatgate.accounts import Accounts, TokenCache
from chatgate.security.principal import Principal
from chatgate.security.tokens import token_hash
from chatgate.store import db
from chatgate.store.listener import APPLICATION_NAME, ChangeListener

pytestmark = [pytest.mark.postgres, pytest.mark.backends("postgresql")]


@pytest.fixture
def pg_url(backend: str, database_url: str) -> Iterator[str]:
    """A migrated database of its own."""

    async def migrate() -> None:
        engine = db.create_engine(database_url)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    yield database_url


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


def test_a_change_to_tokens_or_users_by_any_connection_is_heard(pg_url: str) -> None:
    async def go() -> list[str]:
        engine = db.create_engine(pg_url)
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
            await _sql(pg_url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE id = $1", info.id)
            await _until(lambda: len(heard) == 2)
            await _sql(pg_url, "UPDATE chatgate_users SET is_admin = true")
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


def test_the_cache_is_not_trusted_while_the_listener_is_down_and_is_dropped_when_it_is_back(pg_url: str) -> None:
    async def go() -> None:
        engine = db.create_engine(pg_url)
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
            await _sql(pg_url, "ALTER TABLE chatgate_tokens DISABLE TRIGGER chatgate_tokens_notify")
            assert await _terminate_listener(pg_url) == 1
            await _until(lambda: not listener.listening, timeout=1.0)  # at once, not at the next ping
            await _sql(pg_url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE id = $1", info.id)
            assert cache.get(token_hash(token)) is None  # the kept answer is not served...
            assert await accounts.principal_for_token(token) is None  # ...the database is read
            await _sql(pg_url, "UPDATE chatgate_tokens SET revoked_at = NULL WHERE id = $1", info.id)
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


def test_a_database_without_the_triggers_is_never_trusted(pg_url: str) -> None:
    services.sql(pg_url, "DROP TRIGGER chatgate_tokens_notify ON chatgate_tokens")

    async def go() -> bool:
        engine = db.create_engine(pg_url)
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
    pg_url: str,
) -> None:
    async def go() -> None:
        engine = db.create_engine(pg_url)
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
