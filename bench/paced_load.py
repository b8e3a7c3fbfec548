"""The paced scenario's load generator: C streams at once, each read timed.

    python -m bench.paced_load '<spec json>'   # prints the result as JSON on stdout

`concurrency` keep-alive connections each ask for one paced stream after another. Their first
requests are spread evenly over one stream's duration (`ramp`), so that in the measured window
that follows, streams start and end at a steady rate, as users' chats do, instead of all at once.
In the window (`window` seconds after the ramp) it records, per stream, the time to first body
byte (streams that started in the window) and the largest gap between two reads of its body
(both reads in the window), the body bytes read (which `bench.paced` turns into relayed events),
and the CPU of the server, the upstream and itself. At the window's end it closes every
connection: streams in flight are cut, which the servers must take as a client leaving.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench import procs
from bench.loadgen import HttpConn, Recorder, Spec, Window, build_request


@dataclass
class PacedSpec:
    port: int
    path: str
    body: str
    concurrency: int
    ramp: float  # seconds over which the connections' first requests are spread
    window: float  # measured seconds after the ramp
    host: str = "127.0.0.1"
    headers: dict[str, str] = field(default_factory=dict)
    expect_tail: str | None = None
    timeout: float = 60.0
    watch_pids: list[int] = field(default_factory=list)
    aux_pids: list[int] = field(default_factory=list)
    core_pids: dict[str, list[int]] = field(default_factory=dict)


class Clock:
    """The measured window, shared by every connection."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    def inside(self, t: float) -> bool:
        return self.start <= t <= self.end


class PacedConn(HttpConn):
    """A client connection that times every read of a response body."""

    def __init__(self, expect_tail: bytes | None, clock: Clock) -> None:
        super().__init__(expect_tail)
        self.clock = clock
        self.last_read = 0.0
        self.max_gap = -1.0  # of the current stream, both reads in the window; -1: none yet
        self.window_bytes = 0  # body bytes read in the window, every stream of this connection
        self.stream_bytes = 0  # body bytes of the current stream

    def request(self, data: bytes, on_first: Any = None) -> asyncio.Future[Any]:
        self.last_read, self.max_gap, self.stream_bytes = 0.0, -1.0, 0
        return super().request(data, on_first)

    def _body(self, data: bytes | bytearray) -> None:
        if not data:
            return
        now = time.perf_counter()
        super()._body(data)
        clock = self.clock
        if clock.start <= now <= clock.end:
            self.window_bytes += len(data)
            if self.last_read >= clock.start and now - self.last_read > self.max_gap:
                self.max_gap = now - self.last_read
        self.last_read = now
        self.stream_bytes += len(data)


async def run(spec: PacedSpec) -> dict[str, Any]:
    req = build_request(Spec(port=spec.port, path=spec.path, body=spec.body, host=spec.host, headers=spec.headers))
    tail = spec.expect_tail.encode() if spec.expect_tail else None
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    clock = Clock(t0 + spec.ramp, t0 + spec.ramp + spec.window)
    rec = Recorder()  # the errors in the window
    ttfbs: list[float] = []  # of the streams that started in the window (taken at their first byte)
    gaps: list[float] = []  # per stream: its largest gap between reads in the window
    stream_bytes: list[int] = []  # body bytes of the streams that ended well
    conns: list[PacedConn] = []
    addr = Spec(port=spec.port, path=spec.path, body="", host=spec.host)

    async def worker(idx: int) -> None:
        await asyncio.sleep(idx * spec.ramp / spec.concurrency)
        conn: PacedConn | None = None
        while time.perf_counter() < clock.end:
            if conn is None or conn.lost:
                try:
                    opening = loop.create_connection(lambda: PacedConn(tail, clock), addr.host, addr.port)
                    _, conn = await asyncio.wait_for(opening, spec.timeout)
                except (OSError, TimeoutError) as exc:
                    if clock.inside(time.perf_counter()):
                        rec.errors["connect_" + type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                assert conn is not None
                conns.append(conn)
            started = time.perf_counter()
            on_first = None
            if clock.inside(started):

                def on_first(c: PacedConn = conn) -> None:
                    ttfbs.append(c.ttfb)

            try:
                out = await asyncio.wait_for(conn.request(req, on_first), spec.timeout)
            except TimeoutError:
                rec.errors["timeout"] += 1
                conn.close()
                conn = None
                continue
            if conn.max_gap >= 0:
                gaps.append(conn.max_gap)
            if out.ok:
                stream_bytes.append(conn.stream_bytes)
            if not out.ok and time.perf_counter() >= clock.start:
                rec.errors[out.error] += 1
            if not out.keep_alive:
                conn.close()
                conn = None

    tasks = [asyncio.create_task(worker(i)) for i in range(spec.concurrency)]
    await asyncio.sleep(max(0.0, clock.start - time.perf_counter()))
    with Window(Spec(port=spec.port, path="", body="", **_pids(spec))) as win:
        await asyncio.sleep(max(0.0, clock.end - time.perf_counter()))
        rss_kb = procs.rss_kb(spec.watch_pids)
    for task in tasks:
        task.cancel()
    # The streams cut at the window's end count with the gaps they had in it.
    gaps.extend(c.max_gap for c in conns if c.waiter is not None and c.max_gap >= 0)
    for conn in conns:
        conn.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "errors": dict(rec.errors),
        "streams_started": len(ttfbs),
        "ttfb_ms": [round(t * 1000, 4) for t in ttfbs],
        **win.as_dict(),
        "concurrency": spec.concurrency,
        "max_gap_ms": [round(g * 1000, 4) for g in gaps],
        "window_bytes": sum(c.window_bytes for c in conns),
        "stream_bytes": stream_bytes[:50],
        "rss_kb": rss_kb,
    }


def _pids(spec: PacedSpec) -> dict[str, Any]:
    return {"watch_pids": spec.watch_pids, "aux_pids": spec.aux_pids, "core_pids": spec.core_pids}


def main() -> None:
    spec = PacedSpec(**json.loads(sys.argv[1]))
    procs.raise_fd_limit()
    json.dump(uvloop.run(run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
