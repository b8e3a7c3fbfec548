"""The load generator: raw asyncio protocol on uvloop, hand-rolled HTTP/1.1, minimal chunked reader.

    python -m bench.loadgen '<spec json>'   # prints the result as JSON on stdout

httpx or aiohttp would spend more CPU per request than the servers under test and could not hold
10,000 streams on a shared core, so the client is the smallest thing that speaks HTTP/1.1:
one pre-encoded request, a parser for status line, `transfer-encoding: chunked`,
`content-length` or read-until-close bodies, and nothing else.

Two modes:
- `closed`: `concurrency` keep-alive connections each send one request after another, for
  `warmup` seconds (discarded), then for `duration` seconds (measured).
- `hold`: `streams` requests, each on its own connection, no more than `ramp` waiting for their
  first byte at once; when every stream has its first byte (or `hold_timeout` passes) the
  server's RSS is sampled and the hold is released (`POST /_bench/release` on `release_port`).

Time to first byte is measured to the first byte of the response *body* (the first delta), from
the moment the request is written. CPU and RSS of `watch_pids` are read from /proc at the edges
of the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import uvloop

from bench import procs

_HEAD, _SIZE, _DATA, _DATA_CRLF, _TRAILER, _LENGTH, _UNTIL_CLOSE = range(7)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


@dataclass
class Spec:
    port: int
    path: str
    body: str
    mode: str = "closed"
    host: str = "127.0.0.1"
    headers: dict[str, str] = field(default_factory=dict)
    expect_tail: str | None = None  # the body, right-stripped, must end with this
    concurrency: int = 1
    warmup: float = 1.0
    duration: float = 3.0
    timeout: float = 30.0
    streams: int = 10_000
    ramp: int = 1000
    hold_timeout: float = 60.0
    settle: float = 1.0
    release_port: int | None = None
    watch_pids: list[int] = field(default_factory=list)
    aux_pids: list[int] = field(default_factory=list)
    # The bench's own processes on each core (server, upstream; this process is
    # added to the client core): CPU on a core beyond theirs is "other load".
    core_pids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Outcome:
    ok: bool
    error: str
    ttfb: float
    total: float
    keep_alive: bool


def build_request(spec: Spec) -> bytes:
    body = spec.body.encode()
    head = [
        f"POST {spec.path} HTTP/1.1",
        f"host: {spec.host}:{spec.port}",
        "content-type: application/json",
        "accept: */*",
        f"content-length: {len(body)}",
        *(f"{k}: {v}" for k, v in spec.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class HttpConn(asyncio.Protocol):
    """One client connection; `request()` returns a future of the whole response's `Outcome`."""

    def __init__(self, expect_tail: bytes | None) -> None:
        self.expect_tail = expect_tail
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.remaining = 0
        self.status = 0
        self.close_after = False
        self.tail = b""
        self.t0 = 0.0
        self.ttfb = 0.0
        self.waiter: asyncio.Future[Outcome] | None = None
        self.on_first: Callable[[], None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def request(self, data: bytes, on_first: Callable[[], None] | None = None) -> asyncio.Future[Outcome]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.on_first = on_first
        self.state, self.tail, self.ttfb, self.status = _HEAD, b"", 0.0, 0
        self.t0 = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _body(self, data: bytes | bytearray) -> None:
        if not data:
            return
        if not self.ttfb:
            self.ttfb = time.perf_counter() - self.t0
            if self.on_first is not None:
                self.on_first()
        self.tail = (self.tail + data)[-48:]

    def _finish(self, error: str = "") -> None:
        waiter, self.waiter = self.waiter, None
        self.state = _HEAD
        if waiter is None or waiter.done():
            return
        if not error and self.status != 200:
            error = f"status_{self.status}"
        if not error and self.expect_tail is not None and not self.tail.rstrip().endswith(self.expect_tail):
            error = "bad_body"
        total = time.perf_counter() - self.t0
        waiter.set_result(Outcome(not error, error, self.ttfb, total, not self.close_after and not self.lost))
        if self.close_after:
            self.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        while pos < n:
            state = self.state
            if state == _HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                head = bytes(buf[pos : i + 2])
                pos = i + 4
                try:
                    self.status = int(head[9:12])
                except ValueError:
                    self.status = 0
                self.close_after = _CLOSE.search(head) is not None
                if _CHUNKED.search(head):
                    self.state = _SIZE
                elif (m := _CONTENT_LENGTH.search(head)) is not None:
                    self.remaining = int(m.group(1))
                    self.state = _LENGTH
                    if self.remaining == 0:
                        self._finish()
                else:
                    self.state = _UNTIL_CLOSE
            elif state == _SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                try:
                    size = int(bytes(buf[pos:i]).split(b";", 1)[0], 16)
                except ValueError:
                    self._finish("bad_framing")
                    self.close()
                    return
                pos = i + 2
                self.remaining = size
                self.state = _DATA if size else _TRAILER
            elif state in (_DATA, _LENGTH):
                take = min(n - pos, self.remaining)
                self._body(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == _DATA:
                        self.state = _DATA_CRLF
                    else:
                        self._finish()
            elif state == _DATA_CRLF:
                if n - pos < 2:
                    break
                pos += 2
                self.state = _SIZE
            elif state == _TRAILER:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                empty = i == pos  # an empty line ends the (always empty, in practice) trailer section
                pos = i + 2
                if empty:
                    self._finish()
            else:  # _UNTIL_CLOSE
                self._body(buf[pos:n])
                pos = n
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            if self.state == _UNTIL_CLOSE:
                self._finish()
            else:
                self._finish("reset" if exc is not None else "closed_early")


async def connect(spec: Spec, expect_tail: bytes | None, timeout: float | None = None) -> HttpConn:
    """Open a connection; a dropped SYN (full accept queue) would otherwise wait for minutes."""
    loop = asyncio.get_running_loop()
    opening = loop.create_connection(lambda: HttpConn(expect_tail), spec.host, spec.port)
    _, conn = await asyncio.wait_for(opening, timeout or spec.timeout)
    return conn


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return "connect_" + errno.errorcode.get(exc.errno, str(exc.errno))
    return "connect_" + type(exc).__name__


class Recorder:
    def __init__(self) -> None:
        self.ttfb: list[float] = []
        self.total: list[float] = []
        self.errors: Counter[str] = Counter()

    def add(self, out: Outcome) -> None:
        if out.ok:
            self.ttfb.append(out.ttfb)
            self.total.append(out.total)
        else:
            self.errors[out.error] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": len(self.total),
            "ttfb_ms": [round(x * 1000, 4) for x in self.ttfb],
            "total_ms": [round(x * 1000, 4) for x in self.total],
            "errors": dict(self.errors),
        }


class Window:
    """CPU and peak RSS of the watched processes (and the client core's) over a measured window."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def __enter__(self) -> Window:
        procs.reset_hwm(self.spec.watch_pids)
        self.cpu0 = procs.cpu_seconds(self.spec.watch_pids)
        self.aux0 = procs.cpu_seconds(self.spec.aux_pids)
        self.self0 = _self_cpu()
        self.cores0 = self._cores()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.cpu = procs.cpu_seconds(self.spec.watch_pids) - self.cpu0
        self.aux = procs.cpu_seconds(self.spec.aux_pids) - self.aux0
        self.self_cpu = _self_cpu() - self.self0
        # CPU that processes outside the bench (someone else's build, say) took on each core.
        cores1 = self._cores()
        self.other_cpu = {
            core: max(0.0, (busy - ours) - (self.cores0[core][0] - self.cores0[core][1]))
            for core, (busy, ours) in cores1.items()
        }
        self.hwm_kb = procs.hwm_kb(self.spec.watch_pids)

    def _cores(self) -> dict[str, tuple[float, float]]:
        """Per core: (CPU used by anything, CPU used by the bench's processes there)."""
        out = {}
        for core, pids in self.spec.core_pids.items():
            ours = procs.cpu_seconds(pids) + (_self_cpu() if core == procs.CLIENT_CORE else 0.0)
            out[core] = (procs.core_busy_seconds(core), ours)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed,
            "server_cpu_s": self.cpu,
            "upstream_cpu_s": self.aux,
            "loadgen_cpu_s": self.self_cpu,
            "peak_rss_kb": self.hwm_kb,
            "other_cpu_s": self.other_cpu,
        }


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def closed_loop(spec: Spec) -> dict[str, Any]:
    req = build_request(spec)
    tail = spec.expect_tail.encode() if spec.expect_tail else None
    conns: list[HttpConn | None] = [None] * spec.concurrency

    async def worker(idx: int, deadline: float, rec: Recorder) -> None:
        while time.perf_counter() < deadline:
            conn = conns[idx]
            if conn is None or conn.lost:
                try:
                    conn = conns[idx] = await connect(spec, tail)
                except OSError as exc:
                    rec.errors[_error_name(exc)] += 1
                    await asyncio.sleep(0.05)
                    continue
            try:
                out = await asyncio.wait_for(conn.request(req), spec.timeout)
            except TimeoutError:
                rec.errors["timeout"] += 1
                conn.close()
                conns[idx] = None
                continue
            rec.add(out)
            if not out.keep_alive:
                conn.close()
                conns[idx] = None

    async def phase(seconds: float, rec: Recorder) -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(worker(i, deadline, rec) for i in range(spec.concurrency)))

    if spec.warmup > 0:
        await phase(spec.warmup, Recorder())
    rec = Recorder()
    with Window(spec) as win:
        await phase(spec.duration, rec)
    for conn in conns:
        if conn is not None:
            conn.close()
    return {**rec.as_dict(), **win.as_dict(), "throughput_rps": len(rec.total) / win.elapsed}


async def _control(spec: Spec, path: str) -> None:
    if spec.release_port is None:
        return
    ctl = Spec(port=spec.release_port, path=path, body="", host=spec.host)
    conn = await connect(ctl, None)
    await asyncio.wait_for(conn.request(build_request(ctl)), 10)
    conn.close()


async def hold(spec: Spec) -> dict[str, Any]:
    req = build_request(spec)
    tail = spec.expect_tail.encode() if spec.expect_tail else None
    await _control(spec, "/_bench/rearm")
    rss_idle = procs.rss_kb(spec.watch_pids)
    rec = Recorder()
    gate = asyncio.Semaphore(spec.ramp)
    all_held = asyncio.Event()
    counts = {"held": 0, "open": 0, "settled": 0}  # settled: held, or ended without a first byte
    loop = asyncio.get_running_loop()
    hold_deadline = loop.time() + spec.hold_timeout

    def settle() -> None:
        counts["settled"] += 1
        if counts["settled"] == spec.streams:
            all_held.set()

    async def stream() -> None:
        await gate.acquire()
        first = loop.create_future()
        held = False

        def got_first() -> None:
            if not first.done():
                first.set_result(None)

        conn: HttpConn | None = None
        try:
            conn = await connect(spec, tail, max(0.1, hold_deadline - loop.time()))
            done = conn.request(req, got_first)
            await asyncio.wait_for(
                asyncio.wait([first, done], return_when=asyncio.FIRST_COMPLETED),
                max(0.1, hold_deadline - loop.time()),
            )
            if first.done():
                held = True
                counts["held"] += 1
                counts["open"] += 1
                gate.release()
                settle()
            rec.add(await asyncio.wait_for(done, spec.hold_timeout + spec.timeout))
        except TimeoutError:
            rec.errors["timeout"] += 1
        except OSError as exc:
            rec.errors[_error_name(exc)] += 1
        finally:
            if held:
                counts["open"] -= 1
            else:
                gate.release()
                settle()
            if conn is not None:
                conn.close()

    with Window(spec) as win:
        tasks = [asyncio.create_task(stream()) for _ in range(spec.streams)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_held.wait(), spec.hold_timeout)
        time_to_hold = time.perf_counter() - win.t0
        await asyncio.sleep(spec.settle)
        rss_hold = procs.rss_kb(spec.watch_pids)
        open_streams = counts["open"]
        await _control(spec, "/_bench/release")
        await asyncio.gather(*tasks)
    held = open_streams
    return {
        **rec.as_dict(),
        **win.as_dict(),
        "streams": spec.streams,
        "held": held,
        "time_to_hold_s": time_to_hold,
        "rss_idle_kb": rss_idle,
        "rss_hold_kb": rss_hold,
        "rss_per_stream_kb": (rss_hold - rss_idle) / held if held else None,
        "throughput_rps": len(rec.total) / win.elapsed,
    }


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    procs.raise_fd_limit()
    result = uvloop.run(hold(spec) if spec.mode == "hold" else closed_loop(spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
