"""Per-user limits: GCRA request rate, concurrent streams, bounded memory, with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from chatgate.errors import RateLimited
from chatgate.security.limits import Limiter, MemoryLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def hit(limiter: Limiter, user: str = "u1") -> int | None:
    """None when admitted, else the Retry-After seconds."""
    try:
        asyncio.run(limiter.hit(user))
    except RateLimited as exc:
        assert exc.status == 429
        return exc.retry_after
    return None


def test_burst_up_to_the_limit_then_refused_with_retry_after() -> None:
    clock = Clock()
    limiter = MemoryLimiter(requests_per_minute=3, clock=clock)
    assert [hit(limiter) for _ in range(3)] == [None, None, None]
    assert hit(limiter) == 20  # one request frees up every 60/3 s
    clock.now += 19.5
    assert hit(limiter) == 1
    clock.now += 0.5
    assert hit(limiter) is None
    assert hit(limiter) == 20


def test_refused_requests_do_not_count() -> None:
    clock = Clock()
    limiter = MemoryLimiter(requests_per_minute=2, clock=clock)
    hit(limiter), hit(limiter)
    for _ in range(50):
        assert hit(limiter) == 30
    clock.now += 30
    assert hit(limiter) is None


def test_a_steady_rate_at_the_limit_is_never_refused() -> None:
    clock = Clock()
    limiter = MemoryLimiter(requests_per_minute=60, clock=clock)
    for _ in range(600):
        assert hit(limiter) is None
        clock.now += 1.0


def test_hammering_gets_the_documented_rate() -> None:
    clock = Clock()
    limiter = MemoryLimiter(requests_per_minute=10, clock=clock)
    admitted: list[float] = []
    for _ in range(4 * 60 * 10):  # ten minutes, four tries a second
        if hit(limiter) is None:
            admitted.append(clock.now)
        clock.now += 0.25
    # The burst of 10, then one every 6 s: rpm a minute in the long run ...
    assert len(admitted) == 10 + 99
    # ... and never more than 2 * rpm - 1 in any 60 s window (the burst plus the refill).
    for i, start in enumerate(admitted):
        assert sum(1 for t in admitted[i:] if t < start + 60) <= 19
    later = [t for t in admitted if t >= admitted[0] + 60]
    for i, start in enumerate(later):
        assert sum(1 for t in later[i:] if t < start + 60) <= 10


def test_users_are_independent() -> None:
    limiter = MemoryLimiter(requests_per_minute=1, clock=Clock())
    assert hit(limiter, "a") is None
    assert hit(limiter, "b") is None
    assert hit(limiter, "a") == 60


def test_zero_means_unlimited_and_keeps_no_state() -> None:
    limiter = MemoryLimiter(requests_per_minute=0, max_concurrent_streams=0, clock=Clock())
    for i in range(1000):
        assert hit(limiter, str(i)) is None
    assert limiter.tracked_users() == 0
    assert limiter.stream("a") is limiter.stream("b")  # a shared no-op context


def test_idle_users_are_evicted() -> None:
    clock = Clock()
    limiter = MemoryLimiter(requests_per_minute=100, clock=clock)
    for i in range(50):
        hit(limiter, f"user-{i}")
    assert limiter.tracked_users() == 50
    clock.now += 61
    hit(limiter, "fresh")
    assert limiter.tracked_users() == 1


def test_memory_is_bounded_even_with_many_active_users() -> None:
    limiter = MemoryLimiter(requests_per_minute=10, max_users=100, clock=Clock())
    for i in range(10_000):
        hit(limiter, f"user-{i}")
        assert limiter.tracked_users() <= 101
    assert limiter.tracked_users() >= 75


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        MemoryLimiter(requests_per_minute=-1)
    with pytest.raises(ValueError):
        MemoryLimiter(max_concurrent_streams=-1)


def test_concurrent_streams_are_capped_and_released() -> None:
    async def scenario() -> None:
        limiter = MemoryLimiter(max_concurrent_streams=2)
        async with limiter.stream("u"), limiter.stream("u"):
            assert limiter.active_streams("u") == 2
            with pytest.raises(RateLimited) as info:
                async with limiter.stream("u"):
                    pass
            assert info.value.retry_after == 1
            assert limiter.active_streams("u") == 2
            async with limiter.stream("other"):
                pass
        assert limiter.active_streams("u") == 0
        async with limiter.stream("u"):
            pass

    asyncio.run(scenario())


def test_stream_slot_is_released_on_error_and_cancellation() -> None:
    async def scenario() -> None:
        limiter = MemoryLimiter(max_concurrent_streams=1)
        with pytest.raises(RuntimeError):
            async with limiter.stream("u"):
                raise RuntimeError("upstream broke")
        assert limiter.active_streams("u") == 0

        entered = asyncio.Event()

        async def relay() -> None:
            async with limiter.stream("u"):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(relay())
        await entered.wait()
        assert limiter.active_streams("u") == 1
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert limiter.active_streams("u") == 0
        assert limiter._streams == {}  # no entries linger for users without streams

    asyncio.run(scenario())


def test_memory_limiter_satisfies_the_protocol() -> None:
    limiter: Limiter = MemoryLimiter(5, 5)
    assert isinstance(limiter, MemoryLimiter)
