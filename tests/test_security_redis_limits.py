"""`RedisLimiter` against the real Redis: the same limits as `MemoryLimiter`, shared by every
limiter on the same Redis (as instances are), atomic under concurrency, failing open."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from tests.support import free_port, services

from chatgate.errors import RateLimited
from chatgate.metrics import Metrics
from chatgate.security.redis_limits import RedisLimiter

pytestmark = pytest.mark.redis

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _redis_up() -> None:
    services.require("Redis", services.redis_problem())


def run(scenario: Callable[..., Awaitable[T]], *limits: Any, url: str = services.REDIS_URL, **kw: Any) -> T:
    """Run `scenario(limiter_a, limiter_b, metrics)`: two limiters (two instances) on one Redis."""

    async def go() -> T:
        prefix = f"chatgate-test:{uuid.uuid4().hex[:8]}:"
        metrics = Metrics()
        clients = [Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5) for _ in range(2)]
        limiters = [RedisLimiter(c, *limits, metrics=metrics, prefix=prefix, **kw) for c in clients]
        try:
            return await scenario(*limiters, metrics)
        finally:
            for limiter, client in zip(limiters, clients, strict=True):
                await limiter.aclose()
                await client.aclose()

    return asyncio.run(go())


async def admitted(limiter: RedisLimiter, user: str = "u1") -> bool:
    try:
        await limiter.hit(user)
    except RateLimited as exc:
        assert exc.retry_after >= 1
        return False
    return True


def test_rate_limit_is_shared_between_instances() -> None:
    async def scenario(a: RedisLimiter, b: RedisLimiter, _m: Metrics) -> list[bool]:
        return [await admitted(limiter) for limiter in (a, b, a, b, a, b)]

    assert run(scenario, 4) == [True, True, True, True, False, False]


def test_rate_limit_is_per_user_and_reports_retry_after() -> None:
    async def scenario(a: RedisLimiter, _b: RedisLimiter, _m: Metrics) -> tuple[bool, bool, int]:
        await a.hit("u1")
        other = await admitted(a, "u2")
        try:
            await a.hit("u1")
        except RateLimited as exc:
            return False, other, exc.retry_after
        return True, other, 0

    assert run(scenario, 1) == (False, True, 60)


def test_concurrent_hits_are_counted_atomically() -> None:
    async def scenario(a: RedisLimiter, b: RedisLimiter, _m: Metrics) -> int:
        results = await asyncio.gather(*(admitted(limiter) for limiter in [a, b] * 25))
        return sum(results)

    assert run(scenario, 10) == 10


def test_stream_cap_is_shared_and_slots_come_back() -> None:
    async def scenario(a: RedisLimiter, b: RedisLimiter, _m: Metrics) -> None:
        async with a.stream("u1"), b.stream("u1"):
            with pytest.raises(RateLimited):
                async with a.stream("u1"):
                    pass
            async with b.stream("u2"):  # another user has slots of their own
                pass
        async with a.stream("u1"), b.stream("u1"):
            pass

    run(scenario, 0, 2)


def test_a_slot_is_released_when_its_stream_is_cancelled() -> None:
    async def scenario(a: RedisLimiter, b: RedisLimiter, _m: Metrics) -> None:
        entered = asyncio.Event()

        async def streaming() -> None:
            async with a.stream("u1"):
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(streaming())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with b.stream("u1"):
            pass

    run(scenario, 0, 1)


def test_leases_of_a_crashed_instance_lapse_and_live_ones_are_renewed() -> None:
    async def scenario(a: RedisLimiter, b: RedisLimiter, _m: Metrics) -> None:
        crashed = a.stream("u1")
        await crashed.__aenter__()  # never exited: the instance "died"
        await a.aclose()  # ...and renews nothing any more
        with pytest.raises(RateLimited):
            async with b.stream("u1"):
                pass
        await asyncio.sleep(1.1)
        async with b.stream("u1"):  # the dead lease lapsed, this one is renewed while held
            await asyncio.sleep(1.2)
            with pytest.raises(RateLimited):
                async with a.stream("u1"):
                    pass

    run(scenario, 0, 1, lease=1.0)


def test_redis_down_fails_open_with_a_warning_and_a_metric(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(a: RedisLimiter, _b: RedisLimiter, metrics: Metrics) -> str:
        for _ in range(5):
            await a.hit("u1")  # 1 a minute, yet all admitted
        async with a.stream("u1"), a.stream("u1"):
            pass
        return metrics.render().decode()

    caplog.set_level(logging.WARNING, "chatgate.limits")
    exposition = run(scenario, 1, 1, url=f"redis://127.0.0.1:{free_port()}/0")
    assert "chatgate_limits_fail_open_total 7.0" in exposition
    assert 'chatgate_redis_errors_total{operation="hit"} 1.0' in exposition
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per request
    assert "Redis unavailable" in warnings[0].getMessage()
