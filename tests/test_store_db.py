"""store/db.py on both backends: migrations, and outages mapped to ServiceUnavailable in one place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from tests.support import free_port, services

from chatgate.errors import ServiceUnavailable
from chatgate.store import db


def test_migrations_create_the_tables_and_instances_may_run_them_together(backend: str, database_url: str) -> None:
    async def go() -> set[str]:
        engines = [db.create_engine(database_url) for _ in range(3)]
        try:
            if backend == "postgresql":  # instances of a fleet starting together
                await asyncio.gather(*(db.upgrade(engine) for engine in engines))
            else:  # one machine: the server, then the CLI
                for engine in engines:
                    await db.upgrade(engine)
            async with engines[0].connect() as conn:
                return set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
        finally:
            for engine in engines:
                await engine.dispose()

    tables = asyncio.run(go())
    assert {"models", "chatgate_users", "chatgate_tokens", "chatgate_sessions"} <= tables


@pytest.mark.backends("postgresql")
def test_unreachable_database_is_service_unavailable_quickly(backend: str) -> None:
    async def go() -> None:
        engine = db.create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/test", timeout=1)
        try:
            with pytest.raises(ServiceUnavailable):
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(go(), 5))


@pytest.mark.backends("postgresql")
def test_a_statement_past_the_timeout_is_service_unavailable_and_the_pool_goes_on(backend: str) -> None:
    async def go() -> int:
        engine = db.create_engine(services.POSTGRES_URL, timeout=0.5)
        try:
            with pytest.raises(ServiceUnavailable):
                async with engine.begin() as conn:
                    await conn.execute(sa.text("SELECT pg_sleep(3)"))
            async with engine.connect() as conn:
                return int((await conn.execute(sa.text("SELECT 1"))).scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(asyncio.wait_for(go(), 5)) == 1


def test_other_database_errors_pass_through(database_url: str) -> None:
    async def go() -> None:
        engine = db.create_engine(database_url)
        try:
            with pytest.raises(sa.exc.DBAPIError) as caught:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT * FROM no_such_table"))
            assert not isinstance(caught.value, ServiceUnavailable)
        finally:
            await engine.dispose()

    asyncio.run(go())


@pytest.fixture
def private_pg() -> Iterator[services.PrivatePostgres]:
    """A PostgreSQL server of this test's own, which it may freeze."""
    services.require("PostgreSQL's initdb", None if services.PrivatePostgres.binaries() else "no initdb found")
    pg = services.PrivatePostgres(free_port())
    try:
        pg.init().start()
        yield pg
    finally:
        pg.cleanup()


TIMEOUT = 1.0
MARGIN = 0.5  # scheduling on a loaded machine; a second timeout would be 1.0 more


@pytest.mark.backends("postgresql")
def test_a_hung_server_costs_one_timeout_per_block(backend: str, private_pg: services.PrivatePostgres) -> None:
    """Checkout (the pooled connection's ping, then a fresh connect), statements and commit share
    one deadline: a block on a frozen server fails within one timeout, never one per step."""

    async def block(engine: sa.ext.asyncio.AsyncEngine, how: str, freeze: str = "") -> float:
        """One block; `freeze` "midway" or "at the end" freezes the server after a first statement."""
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            async with engine.begin() if how == "begin" else engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                if freeze:
                    await asyncio.sleep(TIMEOUT * 0.6)
                    private_pg.freeze()
                if freeze != "at the end":  # else only the rollback or commit meets the frozen server
                    await conn.execute(sa.text("SELECT 2"))
        return time.monotonic() - started

    async def go() -> tuple[list[float], list[float]]:
        engine = db.create_engine(private_pg.url, timeout=TIMEOUT)
        try:
            async with engine.connect() as conn:  # a pooled connection, to be pinged next time
                await conn.execute(sa.text("SELECT 1"))
            private_pg.freeze()
            try:
                hung = [await block(engine, how) for how in ("connect", "begin", "connect")]
            finally:
                private_pg.thaw()
            midway = []
            for how, freeze in [(h, f) for h in ("connect", "begin") for f in ("midway", "at the end")]:
                try:
                    midway.append(await block(engine, how, freeze))
                finally:
                    private_pg.thaw()
            async with engine.connect() as conn:  # and the pool goes on
                assert (await conn.execute(sa.text("SELECT 3"))).scalar_one() == 3
            return hung, midway
        finally:
            await engine.dispose()

    hung, midway = asyncio.run(asyncio.wait_for(go(), 30))
    assert max(hung) < TIMEOUT + MARGIN, hung
    assert max(midway) < TIMEOUT + MARGIN, midway  # from the block's start, not from the freeze


def test_the_failover_migration_goes_down_and_up_again(database_url: str) -> None:
    """0005 (routes, usage attempts) is reversible: down to 0004 drops what it added, up restores it."""
    from alembic import command

    async def go() -> tuple[set[str], set[str], set[str]]:
        engine = db.create_engine(database_url)
        try:
            await db.upgrade(engine)

            def state(sync: sa.Connection) -> set[str]:
                inspector = sa.inspect(sync)
                columns = {c["name"] for c in inspector.get_columns("chatgate_usage")}
                return set(inspector.get_table_names()) | {f"usage.{c}" for c in columns}

            async with engine.begin() as conn:
                up = await conn.run_sync(state)
                await conn.run_sync(lambda sync: command.downgrade(db._alembic_config(sync), "0004"))
                down = await conn.run_sync(state)
                await conn.run_sync(db._upgrade)
                again = await conn.run_sync(state)
            return up, down, again
        finally:
            await engine.dispose()

    up, down, again = asyncio.run(go())
    added = {"chatgate_model_routes", "usage.attempts", "usage.answered_model_id"}
    assert added <= up
    assert not added & down
    assert again == up
