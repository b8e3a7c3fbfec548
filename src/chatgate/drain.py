"""Graceful shutdown: the chats running in this process, waited for and then ended.

On the first SIGTERM the server (`server.DrainingServer`) keeps serving while `drain()` lets the
running chats finish for up to `CHATGATE_DRAIN_TIMEOUT` seconds; those still running then are
ended through the path a client disconnect takes (`DisconnectWatch`), as a failure the dialect
renders (an aborted body, or a last error event) and usage records with status 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from chatgate.api.asgi import DisconnectWatch
from chatgate.errors import ServiceUnavailable

log = logging.getLogger("chatgate")

SHUTTING_DOWN = "chatgate is shutting down"
# How long the chats ended at the end of a drain get to send their last event and be recorded.
ENDING_GRACE = 5.0


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(SHUTTING_DOWN)


class RunningChats:
    """The chats between their upstream request and their end (`relay.run_chat`)."""

    __slots__ = ("_chats", "_closed", "_idle", "draining")

    def __init__(self) -> None:
        self._chats: set[DisconnectWatch] = set()
        self._idle = asyncio.Event()
        self._closed = False  # the drain is over: a chat that starts now is ended at once
        self.draining = False

    def __len__(self) -> int:
        return len(self._chats)

    def add(self, watch: DisconnectWatch) -> None:
        self._chats.add(watch)
        if self._closed:
            watch.end()

    def discard(self, watch: DisconnectWatch) -> None:
        self._chats.discard(watch)
        if not self._chats:
            self._idle.set()

    async def drain(self, seconds: float) -> int:
        """Let the running chats finish for up to `seconds`, then end the rest and wait
        (briefly) for them to end; returns how many were ended."""
        self.draining = True
        log.info("draining: %d chat(s) running, waiting up to %g s for them to finish", len(self), seconds)
        await self._wait_idle(seconds)
        self._closed = True
        ending = list(self._chats)
        if ending:
            log.warning("drain time is up: ending %d chat(s) still running", len(ending))
        for watch in ending:
            watch.end()
        await self._wait_idle(ENDING_GRACE)
        return len(ending)

    async def _wait_idle(self, seconds: float) -> None:
        if not self._chats:
            return
        self._idle.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
