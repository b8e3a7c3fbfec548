"""Per-user limits shared by every instance, in Redis: `limits.Limiter` for several processes.

Each check is one Lua script, so it is atomic however many instances ask at once:
- the request rate is the same GCRA as `MemoryLimiter` (a burst of rpm, then one every 60/rpm
  seconds), its one float per user kept under `{prefix}rate:{user}` with Redis's own clock, so
  instances with skewed clocks still agree;
- concurrent streams are leases in a sorted set `{prefix}streams:{user}` (member: a slot id,
  score: its expiry). This process renews the leases it holds; a crashed instance's slots
  lapse after `lease` seconds instead of being held for ever.

Redis down or slow (beyond `timeout`): the request is admitted (fail open), with a warning in
the log and a count in `chatgate_limits_fail_open_total`. After a failure Redis is left alone
for `retry_interval` seconds, so an outage costs each request nothing rather than a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatgate.errors import RateLimited
from chatgate.metrics import Metrics
from chatgate.security.limits import _UNLIMITED
from chatgate.tasks import cancel_and_wait

__all__ = ["RedisLimiter"]

log = logging.getLogger("chatgate.limits")

_WINDOW = 60.0

# KEYS[1] rate key; ARGV: interval, window. Returns "0" when admitted, else the wait in seconds.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - tonumber(ARGV[2])
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return '0'
"""

# KEYS[1] streams key; ARGV: cap, slot id, lease seconds. Returns 1 when a slot was taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
return 1
"""

# KEYS: streams keys; ARGV: lease, then one slot id per key. Pushes the held leases forward.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(lease * 1000))
end
return #KEYS
"""


class RedisLimiter:
    """`Limiter` whose state lives in Redis, shared by every chatgate instance using it."""

    def __init__(
        self,
        redis: Redis,
        requests_per_minute: int = 0,
        max_concurrent_streams: int = 0,
        *,
        metrics: Metrics,
        prefix: str = "chatgate:",
        lease: float = 30.0,
        retry_interval: float = 1.0,
    ) -> None:
        if requests_per_minute < 0 or max_concurrent_streams < 0:
            raise ValueError("limits must not be negative")
        self.requests_per_minute = requests_per_minute
        self.max_concurrent_streams = max_concurrent_streams
        self._interval = _WINDOW / requests_per_minute if requests_per_minute else 0.0
        self._redis = redis
        self._metrics = metrics
        self._prefix = prefix
        self._lease = lease
        self._retry_interval = retry_interval
        self._gcra = redis.register_script(_GCRA)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._held: dict[str, str] = {}  # slot id -> streams key, for renewal
        self._down_until = 0.0
        self._renewer: asyncio.Task[None] | None = None

    async def hit(self, user_id: str) -> None:
        """Count one request for `user_id`; RateLimited when over `requests_per_minute`."""
        if not self._interval:
            return
        reply = await self._call("hit", self._gcra, [self._prefix + "rate:" + user_id], [self._interval, _WINDOW])
        if reply is None:
            return
        wait = float(reply)
        if wait > 0:
            raise RateLimited(
                f"too many requests: at most {self.requests_per_minute} a minute",
                retry_after=max(1, math.ceil(wait)),
            )

    def stream(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """A context holding one of the user's `max_concurrent_streams` slots, in every instance."""
        if not self.max_concurrent_streams:
            return _UNLIMITED
        return self._slot(user_id)

    @contextlib.asynccontextmanager
    async def _slot(self, user_id: str) -> AsyncIterator[None]:
        key = self._prefix + "streams:" + user_id
        slot = uuid.uuid4().hex
        taken = await self._call("stream", self._acquire, [key], [self.max_concurrent_streams, slot, self._lease])
        if taken is not None and not int(taken):
            raise RateLimited(f"too many concurrent streams: at most {self.max_concurrent_streams}", retry_after=1)
        if taken is None:  # failed open: nothing to hold or release
            yield
            return
        self._held[slot] = key
        self._ensure_renewer()
        try:
            yield
        finally:
            del self._held[slot]
            # Shielded: a cancelled stream (the client went) must still give its slot back.
            await asyncio.shield(self._release(key, slot))

    async def _release(self, key: str, slot: str) -> None:
        if time.monotonic() < self._down_until:
            return  # the lease lapses by itself
        try:
            await self._redis.zrem(key, slot)
        except (RedisError, OSError) as exc:
            self._failed("release", exc)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name="chatgate-stream-leases")

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self._lease / 3)
            held = list(self._held.items())
            if held and time.monotonic() >= self._down_until:
                try:
                    await self._renew(keys=[key for _, key in held], args=[self._lease, *(s for s, _ in held)])
                except (RedisError, OSError) as exc:
                    self._failed("renew", exc)

    async def _call(self, operation: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script; None when Redis is unavailable (the caller admits the request)."""
        if time.monotonic() < self._down_until:
            self._metrics.limits_fail_open.inc()
            return None
        try:
            reply = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._failed(operation, exc)
            self._metrics.limits_fail_open.inc()
            return None
        if self._down_until:
            self._down_until = 0.0
            log.warning("Redis answers again: per-user limits are shared again")
        return reply

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._metrics.redis_errors.labels(operation).inc()
        if not self._down_until:
            log.warning(
                "Redis unavailable (%s: %s): admitting requests without rate or stream limits until it is back",
                type(exc).__name__,
                exc,
            )
        self._down_until = time.monotonic() + self._retry_interval

    async def aclose(self) -> None:
        """Stop renewing leases (the slots of streams still open lapse by themselves)."""
        await cancel_and_wait(self._renewer)
        self._renewer = None
