"""store/db.py on both backends: migrations, and outages mapped to ServiceUnavailable in one place."""

from __future__ import annotations

import asyncio

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
