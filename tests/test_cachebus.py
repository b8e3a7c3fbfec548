"""`CacheBus` against the real Redis: a change published by one instance reaches the others."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from tests.support import free_port, services

from chatgate.cachebus import CacheBus
from chatgate.metrics import Metrics

pytestmark = pytest.mark.redis


def test_a_published_change_reaches_every_subscriber() -> None:
    services.require("Redis", services.redis_problem())

    async def go() -> list[list[uuid.UUID | None]]:
        prefix = f"chatgate-test:{uuid.uuid4().hex[:8]}:"
        clients = [Redis.from_url(services.REDIS_URL) for _ in range(3)]
        buses = [CacheBus(c, prefix=prefix, metrics=Metrics()) for c in clients]
        seen: list[list[uuid.UUID | None]] = [[], []]
        try:
            for bus, log in zip(buses[:2], seen, strict=True):
                bus.start(log.append)
                async with asyncio.timeout(5):
                    await bus.wait_subscribed()
            changed = uuid.uuid4()
            await buses[2].publish(changed)
            await buses[2].publish(None)
            async with asyncio.timeout(5):
                while any(len(log) < 3 for log in seen):
                    await asyncio.sleep(0.01)
            assert all(log == [None, changed, None] for log in seen)  # None first: the subscription
            return seen
        finally:
            for bus, client in zip(buses, clients, strict=True):
                await bus.aclose()
                await client.aclose()

    asyncio.run(go())


def test_publishing_without_redis_does_not_raise() -> None:
    async def go() -> str:
        client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        metrics = Metrics()
        try:
            await CacheBus(client, metrics=metrics).publish(uuid.uuid4())
        finally:
            await client.aclose()
        return metrics.render().decode()

    assert 'chatgate_redis_errors_total{operation="publish"} 1.0' in asyncio.run(go())
