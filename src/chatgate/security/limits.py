"""Per-user limits: requests per minute and concurrent streams.

`Limiter` is the interface the chat route uses; `MemoryLimiter` keeps the state in this process
(one worker), and a Redis implementation will share it between workers.

The request rate uses GCRA (the generic cell rate algorithm): per user a single float, the
"theoretical arrival time", instead of a log of timestamps. An idle user may send a burst of
`requests_per_minute` at once; after that one request is admitted every 60/rpm seconds. So over
a long span the rate is rpm a minute, while a single 60-second window right after a burst can
see up to 2 * rpm - 1 requests (the burst plus the refill). A strict sliding log would need O(rpm)
memory per user; the burst is what a chat user needs (several quick messages).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol

from chatgate.errors import RateLimited

__all__ = ["Limiter", "MemoryLimiter"]

_WINDOW = 60.0


class Limiter(Protocol):
    """Per-user request rate and concurrent-stream limits; 0 disables either."""

    async def hit(self, user_id: str) -> None:
        """Count one request; raise RateLimited (with retry_after) when over the rate."""

    def stream(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """Hold one concurrent-stream slot while inside; raise RateLimited when none is free."""


class _Unlimited:
    """A stream slot that costs nothing, shared by every caller when streams are unlimited."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_UNLIMITED = _Unlimited()


class _StreamSlot:
    """One concurrent-stream slot of one user, released on exit whatever happened inside."""

    __slots__ = ("_limiter", "_user_id")

    def __init__(self, limiter: MemoryLimiter, user_id: str) -> None:
        self._limiter = limiter
        self._user_id = user_id

    async def __aenter__(self) -> None:
        self._limiter._acquire_stream(self._user_id)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._limiter._release_stream(self._user_id)


class MemoryLimiter:
    """In-process `Limiter`: O(1) state per user, idle users evicted, total size bounded."""

    def __init__(
        self,
        requests_per_minute: int = 0,
        max_concurrent_streams: int = 0,
        *,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_minute < 0 or max_concurrent_streams < 0 or max_users < 1:
            raise ValueError("limits must not be negative, and max_users must be positive")
        self.requests_per_minute = requests_per_minute
        self.max_concurrent_streams = max_concurrent_streams
        self._interval = _WINDOW / requests_per_minute if requests_per_minute else 0.0
        self._max_users = max_users
        self._clock = clock
        # user id -> theoretical arrival time; an entry at or before "now" is an idle user.
        self._tat: dict[str, float] = {}
        self._streams: dict[str, int] = {}
        self._next_sweep = clock() + _WINDOW

    async def hit(self, user_id: str) -> None:
        """Count one request for `user_id`; RateLimited when over `requests_per_minute`."""
        if not self._interval:
            return
        now = self._clock()
        tat = self._tat.get(user_id, now)
        if tat < now:
            tat = now
        new_tat = tat + self._interval
        # Admitted while the backlog (new_tat - now) fits in one window: a burst of rpm, then rpm/60 s.
        wait = new_tat - now - _WINDOW
        if wait > 0:
            raise RateLimited(
                f"too many requests: at most {self.requests_per_minute} a minute",
                retry_after=max(1, math.ceil(wait)),
            )
        self._tat[user_id] = new_tat
        if now >= self._next_sweep or len(self._tat) > self._max_users:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop idle users (their state equals a fresh one); when over `max_users`, also the
        earliest-inserted, down to three quarters so a full table is not swept every request."""
        overflow = len(self._tat) > self._max_users
        self._next_sweep = now + _WINDOW
        for user in [user for user, tat in self._tat.items() if tat <= now]:
            del self._tat[user]
        excess = len(self._tat) - self._max_users * 3 // 4
        if overflow and excess > 0:
            # Forgetting a user only makes their limit lenient, never stricter.
            for user in list(self._tat)[:excess]:
                del self._tat[user]

    def stream(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """A context holding one of the user's `max_concurrent_streams` slots."""
        if not self.max_concurrent_streams:
            return _UNLIMITED
        return _StreamSlot(self, user_id)

    def _acquire_stream(self, user_id: str) -> None:
        count = self._streams.get(user_id, 0)
        if count >= self.max_concurrent_streams:
            raise RateLimited(f"too many concurrent streams: at most {self.max_concurrent_streams}", retry_after=1)
        self._streams[user_id] = count + 1

    def _release_stream(self, user_id: str) -> None:
        count = self._streams.get(user_id, 0) - 1
        # Only users with an open stream have an entry, so this table cannot grow without bound.
        if count > 0:
            self._streams[user_id] = count
        else:
            self._streams.pop(user_id, None)

    def active_streams(self, user_id: str) -> int:
        """How many stream slots the user holds now."""
        return self._streams.get(user_id, 0)

    def tracked_users(self) -> int:
        """How many users have rate state (for tests and metrics)."""
        return len(self._tat)
