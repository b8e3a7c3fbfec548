"""A minimal HTTP/1.1 client for the relay's hot path: keep-alive pool, httptools parser.

Why not aiohttp or httpx: the relay's whole job is one POST and a streamed answer, and the
benchmark (`make bench`, docs/performance.md) showed a general client costing more CPU per
request than everything else chatgate does together (aiohttp about 280 µs, httpx more, for a
32-chunk stream; this client about a fifth of that). What it does not need, it does not do:
no redirects (never followed, by policy), no cookies, no proxies, no compression, no
multipart, no HTTP/2. TLS comes from the standard library, parsing from httptools (the parser
uvicorn uses), and name resolution from the SSRF guard, so the connection goes to exactly the
addresses that were checked.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

# Above this much unread body, stop reading the socket until the relay catches up
# (backpressure from a slow client reaches the upstream's TCP window).
_HIGH_WATER = 256 * 1024
_DNS_TTL = 10.0

Resolve = Callable[[str, int], Awaitable[list[str]]]


class TransportError(Exception):
    """The connection failed; `before_response` is True when no byte of an answer arrived."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class ConnectError(TransportError):
    def __init__(self, message: str) -> None:
        super().__init__(message, before_response=True)


class ConnectTimeout(ConnectError):
    """No connection within the connect timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no connection within {seconds:g} s")


class FirstByteTimeout(Exception):
    """No response head within the first-byte timeout."""


class IdleTimeout(Exception):
    """An open body went quiet for longer than the idle timeout."""


class ProtocolError(Exception):
    """The server sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed request URL: where to connect and what to put on the request line."""

    scheme: str
    host: str
    port: int
    target: bytes
    host_header: bytes

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@lru_cache(maxsize=4096)
def endpoint(url: str) -> Endpoint:
    """Parse (and remember) a URL; raises ValueError for anything but http(s) with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port, path.encode("ascii"), host_header.encode("idna"))


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, key: tuple[str, str, int]) -> None:
        self.key = key
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self._error: BaseException | None = None
        self._paused = False
        self._last_data = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP from the upstream: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        # One wake-up per read, not per body piece the parser found in it.
        if self._chunks:
            if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/1.1 has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.head.done() and self._until_close():
            self.on_message_complete()  # a body without length or chunking ends with the connection
        if not self.complete:
            reason = "the connection was closed before the answer was complete"
            self._fail(TransportError(reason, before_response=not self.got_bytes))
        self._cancel_idle()

    def pause_writing(self) -> None:  # request bodies are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    def _until_close(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Asked now: httptools forgets it once the message is complete.
        self.keep_alive = self._parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self._cancel_idle()
        self._wake()

    # the reading side ----------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: the caller may be gone already
        self._wake()

    def fail_head_after(self, seconds: float) -> asyncio.TimerHandle:
        # A bare timer handle: asyncio.timeout() costs several times more per request.
        return self._loop.call_later(seconds, self._fail, FirstByteTimeout())

    def start_idle_timer(self) -> None:
        if self.complete:
            return  # the whole answer came with its head: nothing to wait for
        self._last_data = self._loop.time()
        self._idle_handle = self._loop.call_at(self._last_data + self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per idle period, re-armed for the remainder, instead of one per chunk.
        due = self._last_data + self._idle_timeout
        if self._loop.time() < due:
            self._idle_handle = self._loop.call_at(due, self._idle_check)
            return
        self._idle_handle = None
        self._fail(IdleTimeout())

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    async def read(self) -> bytes | None:
        """Everything received since the last call, waiting if there is nothing yet; None at the end."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self._error is None

    def recycle(self) -> None:
        self._cancel_idle()
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class Response:
    """An answer whose head has arrived; read the body with `async for chunk in response`, or
    on a hot path `while (chunk := await response.next_chunk()) is not None` (no generator)."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "next_chunk", "status")

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.next_chunk = conn.read  # everything received since the last call; None at the end
        self._released = False
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self._conn.read
        while (chunk := await read()) is not None:
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body (at most `limit` bytes: the connection is then dropped)."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self._conn.read()) is not None:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)[:limit] if limit is not None else b"".join(parts)

    @property
    def complete(self) -> bool:
        return self._conn.complete

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read to the end, else close it
        (so the upstream stops generating an answer nobody reads)."""
        if self._released:
            return
        self._released = True
        self._pool._give_back(self._conn)


class Pool:
    """Keep-alive connections per (scheme, host, port); a connection carries one request at a time."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle_per_host: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_host
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._closed = False

    async def request(
        self, url: str, headers: bytes, body: bytes, *, first_byte_timeout: float, method: bytes = b"POST"
    ) -> Response:
        """Send a request (`headers` are pre-encoded lines, each ending CRLF) and wait for the head.
        A GET sends no body and no Content-Length.

        A pooled connection that the server closed while idle is retried once on a new one."""
        where = endpoint(url)
        length = b"" if method == b"GET" else b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        head = (
            method + b" " + where.target + b" HTTP/1.1\r\nHost: " + where.host_header + b"\r\n"
            + headers + length + b"\r\n"
        )  # fmt: skip
        if method == b"GET":
            body = b""
        for attempt in (0, 1):
            conn, reused = await self._acquire(where)
            assert conn.transport is not None
            conn.transport.write(head + body)
            timer = conn.fail_head_after(first_byte_timeout)
            try:
                await conn.head
            except FirstByteTimeout:
                conn.close()
                raise
            except TransportError as exc:
                conn.close()
                if reused and exc.before_response and attempt == 0:
                    continue  # a stale keep-alive connection: the request never reached a server
                raise
            except BaseException:
                conn.close()
                raise
            finally:
                timer.cancel()
            conn.start_idle_timer()
            return Response(self, conn)
        raise AssertionError("unreachable")

    async def _acquire(self, where: Endpoint) -> tuple[_Connection, bool]:
        idle = self._idle.get(where.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return await self._connect(where), False

    async def _connect(self, where: Endpoint) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = await self._addresses(where.host, where.port)
        ssl_context = self._ssl_context() if where.scheme == "https" else None
        last: OSError | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _transport, conn = await loop.create_connection(
                        lambda: _Connection(loop, self._idle_timeout, where.key),
                        address,
                        where.port,
                        ssl=ssl_context,
                        server_hostname=where.host if ssl_context else None,
                    )
                return conn
            except TimeoutError:
                raise ConnectTimeout(self._connect_timeout) from None
            except OSError as exc:
                last = exc
        raise ConnectError(f"connection failed: {last.strerror if last and last.strerror else last}")

    async def _addresses(self, host: str, port: int) -> list[str]:
        key = (host, port)
        cached = self._dns.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        addresses = await self._resolve(host, port)
        self._dns[key] = (now + _DNS_TTL, addresses)
        return addresses

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _give_back(self, conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            conn.close()
            return
        conn.recycle()
        assert conn.transport is not None
        idle = self._idle.setdefault(conn.key, collections.deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
