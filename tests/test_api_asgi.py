"""The disconnect watch: through chatgate's server signal, and through receive() elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from chatgate.api.asgi import DISCONNECT_EXTENSION, DisconnectSignal, DisconnectWatch


async def waiting_chat(scope: dict[str, Any], receive: Any, started: asyncio.Event) -> bool:
    """A chat parked on its upstream; returns whether the watch absorbed a disconnect."""
    watch = DisconnectWatch(scope, receive)
    try:
        started.set()
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return watch.absorb()
    finally:
        watch.stop()
    return False


def test_the_server_signal_cancels_a_waiting_chat() -> None:
    async def main() -> None:
        signal = DisconnectSignal()
        started = asyncio.Event()

        async def never() -> dict[str, Any]:
            raise AssertionError("receive() is not needed when the server signals")

        task = asyncio.create_task(waiting_chat({"extensions": {DISCONNECT_EXTENSION: signal}}, never, started))
        await started.wait()
        signal.fire()
        assert await asyncio.wait_for(task, 1) is True
        assert signal.callback is None  # stop() unhooked it

    asyncio.run(main())


def test_a_client_gone_before_the_watch_began_is_noticed() -> None:
    async def main() -> None:
        signal = DisconnectSignal()
        signal.fire()
        started = asyncio.Event()
        task = asyncio.create_task(waiting_chat({"extensions": {DISCONNECT_EXTENSION: signal}}, None, started))
        assert await asyncio.wait_for(task, 1) is True

    asyncio.run(main())


def test_other_servers_are_watched_through_receive() -> None:
    async def main() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        started = asyncio.Event()
        task = asyncio.create_task(waiting_chat({}, receive, started))
        await started.wait()
        gone.set()
        assert await asyncio.wait_for(task, 1) is True

    asyncio.run(main())


def test_an_outside_cancellation_is_not_taken_for_a_disconnect() -> None:
    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(
            waiting_chat({"extensions": {DISCONNECT_EXTENSION: DisconnectSignal()}}, None, started)
        )
        await started.wait()
        task.cancel()
        assert await asyncio.wait_for(task, 1) is False

    asyncio.run(main())


def test_read_body_bounds_a_stalled_body_itself_under_other_servers() -> None:
    from chatgate.api.asgi import BODY_TIMEOUT_EXTENSION, read_body
    from chatgate.errors import RequestTimeout

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(30)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> None:
        try:
            await read_body({"headers": []}, trickle, 1024, stall=0.1)
        except RequestTimeout as exc:
            assert "stalled" in exc.message
        else:
            raise AssertionError("a stalled body was waited for")
        # Under chatgate's own server the protocol answers 408 instead: no timer here.
        scope = {"headers": [], "extensions": {BODY_TIMEOUT_EXTENSION: True}}
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read_body(scope, trickle, 1024, stall=0.1), 0.3)

    asyncio.run(main())
