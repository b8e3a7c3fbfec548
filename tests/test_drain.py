"""The registry of running chats that a shutdown drains (`drain.py`), with real DisconnectWatches."""

from __future__ import annotations

import asyncio

from chatgate.api.asgi import DISCONNECT_EXTENSION, DisconnectSignal, DisconnectWatch
from chatgate.drain import RunningChats


async def chat(chats: RunningChats, seconds: float) -> str:
    """A chat parked on its upstream for `seconds`: how it ended."""
    watch = DisconnectWatch({"extensions": {DISCONNECT_EXTENSION: DisconnectSignal()}}, None)  # type: ignore[arg-type]
    try:
        chats.add(watch)
        await asyncio.sleep(seconds)
        return "finished"
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        return "ended" if watch.ending else "client gone"
    finally:
        watch.stop()
        chats.discard(watch)


def test_chats_that_finish_in_time_finish_and_the_rest_are_ended() -> None:
    async def main() -> None:
        chats = RunningChats()
        quick = asyncio.create_task(chat(chats, 0.05))
        slow = asyncio.create_task(chat(chats, 30))
        await asyncio.sleep(0)
        assert len(chats) == 2
        assert await chats.drain(0.5) == 1
        assert chats.draining
        assert await quick == "finished"
        assert await slow == "ended"
        assert len(chats) == 0

    asyncio.run(main())


def test_a_drain_with_nothing_running_returns_at_once() -> None:
    async def main() -> None:
        chats = RunningChats()
        async with asyncio.timeout(0.5):
            assert await chats.drain(30) == 0

    asyncio.run(main())


def test_a_chat_that_starts_after_the_drain_is_ended_at_once() -> None:
    async def main() -> None:
        chats = RunningChats()
        await chats.drain(0)
        async with asyncio.timeout(1):
            assert await chat(chats, 30) == "ended"

    asyncio.run(main())


def test_a_stopped_watch_is_not_ended() -> None:
    """A chat already ending by itself (its failure branch stopped the watch) is left alone."""

    async def main() -> None:
        chats = RunningChats()
        watch = DisconnectWatch({"extensions": {DISCONNECT_EXTENSION: DisconnectSignal()}}, None)  # type: ignore[arg-type]
        chats.add(watch)
        watch.stop()
        watch.end()
        await asyncio.sleep(0)  # a cancellation would land here
        assert not watch.ending
        chats.discard(watch)

    asyncio.run(main())
