"""The floor: a bare ASGI app that streams the same N delta texts with no upstream at all.

    BENCH_CHUNKS=32 uvicorn bench.floor:app --loop uvloop --http httptools --no-access-log

Any POST answers 200 text/plain, each delta text its own `http.response.body` message, which is
the least work an ASGI server can do for a streamed completion; chatgate's CPU per request is
compared with this. `POST /slow` streams one delta every BENCH_SLOW_DELAY seconds until
`POST /_bench/release` (the 10k hold); `POST /_bench/rearm` arms it again. `POST /paced` streams
BENCH_PACED_TOKENS delta texts BENCH_PACED_INTERVAL seconds apart, as the upstream's paced stream
does, each its own `http.response.body`: the floor of the paced scenario (`bench/paced.py`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bench.payload import chunk_texts

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
}
_END = {"type": "http.response.body", "body": b"", "more_body": False}


class FloorApp:
    def __init__(
        self, chunks: int, slow_delay: float, max_hold: float, paced_tokens: int = 256, paced_interval: float = 0.02
    ) -> None:
        self.bodies = _bodies(chunks)
        self.slow_delay = slow_delay
        self.max_hold = max_hold
        self.paced_bodies = _bodies(paced_tokens)
        self.paced_interval = paced_interval
        self.gate: asyncio.Event | None = None

    @classmethod
    def from_env(cls) -> FloorApp:
        return cls(
            int(os.environ.get("BENCH_CHUNKS", "32")),
            float(os.environ.get("BENCH_SLOW_DELAY", "1.0")),
            float(os.environ.get("BENCH_MAX_HOLD", "180")),
            int(os.environ.get("BENCH_PACED_TOKENS", "256")),
            float(os.environ.get("BENCH_PACED_INTERVAL", "0.02")),
        )

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        path: str = scope["path"]
        if self.gate is None:
            self.gate = asyncio.Event()
        if path == "/_bench/release":
            self.gate.set()
        elif path == "/_bench/rearm":
            self.gate.set()
            self.gate = asyncio.Event()
        await send(_START)
        if path == "/slow":
            await self._hold(send, self.gate)
        elif path == "/paced":
            await self._paced(send)
        elif scope["method"] == "POST" and not path.startswith("/_bench/"):
            for body in self.bodies:
                await send(body)
        await send(_END)

    async def _paced(self, send: Send) -> None:
        # Deadlines on an absolute schedule, as the upstream's pacer keeps them.
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, body in enumerate(self.paced_bodies):
            if i:
                await asyncio.sleep(start + i * self.paced_interval - loop.time())
            await send(body)

    async def _hold(self, send: Send, gate: asyncio.Event) -> None:
        await send(self.bodies[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_hold
        i = 1
        while not gate.is_set() and loop.time() < deadline:
            try:
                await asyncio.wait_for(gate.wait(), self.slow_delay)
            except TimeoutError:
                await send(self.bodies[i % len(self.bodies)])
                i += 1
        await send(self.bodies[-1])


def _bodies(n: int) -> list[Message]:
    return [{"type": "http.response.body", "body": t.encode(), "more_body": True} for t in chunk_texts(n)]


app = FloorApp.from_env()
