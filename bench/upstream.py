"""A fast OpenAI-compatible upstream: raw asyncio protocol on uvloop, pre-encoded chunks.

    python -m bench.upstream --port P [--chunks 32] [--delay 0] [--slow-delay 1] [--coalesce]

Routes (any prefix before `/chat/completions` is accepted, e.g. `/v1/...`):
- `POST .../chat/completions`: an SSE stream of N deltas (or JSON when `"stream": true` is absent).
  With `--delay 0` every chunk is written at once, each as its own `write()` (one `write()` for the
  whole stream with `--coalesce`); otherwise it sleeps `delay` seconds between chunks.
- `POST /slow/.../chat/completions`: the hold stream. First delta at once, then one delta every
  `--slow-delay` seconds until `POST /_bench/release` (or `--max-hold` seconds), then the end.
- `POST /paced/.../chat/completions`: a real model server's shape (`--paced-tokens` deltas,
  `--paced-interval` seconds apart, one event per write, chunked, keep-alive): the first delta at
  once, then one write per interval; the stop event, `[DONE]` and the last chunk are the final write.
  One timer for all paced streams (`Pacer`) keeps the upstream cheap at thousands of streams.
- `POST /_bench/rearm` makes new slow streams hold again; `GET /healthz`, `GET .../models`.

It is a protocol and not an ASGI app so that it stays far cheaper per request than anything
measured against it; httptools parses the requests, as it does inside uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

import httptools
import uvloop

from bench import payload

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


@dataclass(frozen=True)
class UpstreamConfig:
    chunks: int = 32
    delay: float = 0.0
    slow_delay: float = 1.0
    max_hold: float = 180.0
    coalesce: bool = False
    paced_tokens: int = 256
    paced_interval: float = 0.02


class HoldGate:
    """Releases the slow streams; a re-armed gate holds the streams that start after it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def release(self) -> None:
        self.event.set()

    def rearm(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


def _simple(status: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + ctype
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Responses:
    """Every response the upstream sends, encoded once at start-up."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.head = payload.CHUNK_HEAD + b"\r\n"
        self.frames = payload.sse_frames(cfg.chunks)
        self.tail = self.frames[-2] + self.frames[-1] + payload.LAST_CHUNK  # stop event, [DONE], end
        self.whole = self.head + b"".join(self.frames) + payload.LAST_CHUNK
        self.first = self.head + self.frames[0]
        self.json = _simple(b"200 OK", payload.completion_json(cfg.chunks))
        self.models = _simple(
            b"200 OK", b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % payload.MODEL.encode()
        )
        self.ok = _simple(b"200 OK", b"ok", b"text/plain")
        self.not_found = _simple(b"404 Not Found", b'{"error":{"message":"not found"}}')


class _PacedStream:
    __slots__ = ("close_after", "next", "transport")

    def __init__(self, transport: asyncio.Transport, close_after: bool) -> None:
        self.transport, self.next, self.close_after = transport, 1, close_after


class Pacer:
    """Writes the paced streams' events on one shared timer of `TICK` seconds.

    A task (or a timer) per stream per event would cost the upstream, on the client core, more
    than the relay it measures costs on the server core at a thousand streams; here a stream's
    event is one `write()` in a batch of the streams due on the same tick. Ticks run on an absolute
    schedule, so the pace does not drift with the work done per tick.
    """

    TICK = 0.001

    def __init__(self, cfg: UpstreamConfig) -> None:
        frames = payload.sse_frames(cfg.paced_tokens)
        head = payload.CHUNK_HEAD + b"\r\n"
        # One write per delta; the stop event, [DONE] and the last chunk go in the final write.
        self.writes = [head + frames[0], *frames[1:-2], frames[-2] + frames[-1] + payload.LAST_CHUNK]
        self.every = max(1, round(cfg.paced_interval / self.TICK))
        self.due: defaultdict[int, list[_PacedStream]] = defaultdict(list)
        self.tick = 0
        self.t0 = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self, transport: asyncio.Transport, close_after: bool) -> None:
        """Write the head and first delta now, the rest one interval apart."""
        transport.write(self.writes[0])
        loop = asyncio.get_running_loop()
        if self.timer is None:
            self.t0, self.tick = loop.time(), 0
            self.timer = loop.call_at(self.t0 + self.TICK, self._run)
        self.due[self.tick + self.every].append(_PacedStream(transport, close_after))

    def _run(self) -> None:
        self.tick += 1
        streams = self.due.pop(self.tick, None)
        if streams:
            last = len(self.writes) - 1
            later: list[_PacedStream] = []
            for stream in streams:
                transport, i = stream.transport, stream.next
                if transport.is_closing():
                    continue
                transport.write(self.writes[i])
                if i == last:
                    if stream.close_after:
                        transport.close()
                    continue
                stream.next = i + 1
                later.append(stream)
            if later:
                self.due[self.tick + self.every].extend(later)
        if self.due:
            self.timer = asyncio.get_running_loop().call_at(self.t0 + (self.tick + 1) * self.TICK, self._run)
        else:
            self.timer = None


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, cfg: UpstreamConfig, res: Responses, gate: HoldGate, pacer: Pacer) -> None:
        self.cfg, self.res, self.gate, self.pacer = cfg, res, gate, pacer
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body.clear()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None:
            return
        path = self.url.split(b"?", 1)[0]
        method = self.parser.get_method()
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if not _STREAM_TRUE.search(self.body):
                transport.write(self.res.json)
            elif path.startswith(b"/slow/"):
                self.task = asyncio.get_running_loop().create_task(self._hold(transport))
            elif path.startswith(b"/paced/"):
                self.pacer.start(transport, close_after=not self.parser.should_keep_alive())
                return
            elif self.cfg.delay > 0:
                self.task = asyncio.get_running_loop().create_task(self._paced(transport))
            elif self.cfg.coalesce:
                transport.write(self.res.whole)
            else:
                transport.write(self.res.head)
                for frame in self.res.frames:
                    transport.write(frame)
                transport.write(payload.LAST_CHUNK)
        elif method == b"POST" and path == b"/_bench/release":
            self.gate.release()
            transport.write(self.res.ok)
        elif method == b"POST" and path == b"/_bench/rearm":
            self.gate.rearm()
            transport.write(self.res.ok)
        elif path == b"/healthz":
            transport.write(self.res.ok)
        elif path.endswith(b"/models"):
            transport.write(self.res.models)
        else:
            transport.write(self.res.not_found)
        if not self.parser.should_keep_alive() and self.task is None:
            transport.close()

    async def _paced(self, transport: asyncio.Transport) -> None:
        transport.write(self.res.head)
        for frame in self.res.frames:
            transport.write(frame)
            await asyncio.sleep(self.cfg.delay)
        transport.write(payload.LAST_CHUNK)
        self.task = None

    async def _hold(self, transport: asyncio.Transport) -> None:
        event = self.gate.event
        transport.write(self.res.first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.max_hold
        i = 1
        while not event.is_set() and loop.time() < deadline:
            try:
                await asyncio.wait_for(event.wait(), self.cfg.slow_delay)
            except TimeoutError:
                if transport.is_closing():
                    return
                transport.write(self.res.frames[i % (len(self.res.frames) - 2) or 1])
                i += 1
        transport.write(self.res.tail)
        self.task = None


async def serve(host: str, port: int, cfg: UpstreamConfig) -> None:
    loop = asyncio.get_running_loop()
    res, gate, pacer = Responses(cfg), HoldGate(), Pacer(cfg)
    server = await loop.create_server(
        lambda: UpstreamProtocol(cfg, res, gate, pacer), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds between chunks of a stream")
    ap.add_argument("--slow-delay", type=float, default=1.0, help="seconds between chunks of a hold stream")
    ap.add_argument("--max-hold", type=float, default=180.0, help="a hold stream ends by itself after this")
    ap.add_argument("--coalesce", action="store_true", help="write each fast stream with one write()")
    ap.add_argument("--paced-tokens", type=int, default=256, help="deltas of a /paced/ stream")
    ap.add_argument("--paced-interval", type=float, default=0.02, help="seconds between a /paced/ stream's deltas")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cfg = UpstreamConfig(
        args.chunks, args.delay, args.slow_delay, args.max_hold, args.coalesce, args.paced_tokens, args.paced_interval
    )
    uvloop.run(serve(args.host, args.port, cfg))


if __name__ == "__main__":
    main()
