"""A minimal HTTP/1.1 client for the relay's hot path: keep-alive pool, httptools parser.

Why not aiohttp or httpx: the relay's whole job is one POST and a streamed answer, and the
benchmark (`make bench`, docs/performance.md) showed a general client costing more CPU per
request than everything else chatgate does together (aiohttp about 280 µs, httpx more, for a
32-chunk stream; this client about a fifth of that). What it does not need, it does not do:
no redirects (never followed, by policy), no cookies, no proxies, no compression (it asks for
`identity` and refuses a Transfer-Encoding other than chunked), no multipart, no HTTP/2. TLS
comes from the standard library, parsing from httptools (the parser uvicorn uses), and name
resolution from the SSRF guard, so the connection goes to exactly the addresses that were checked.

What it does, to h11's and httpcore's standard (tests/test_upstream_http11_differential.py holds
it to h11's answers): 1xx heads are skipped and 101 refused; the head (1xx heads included) is
bounded at 64 KiB and a body read whole at `max_body_bytes`; a body that ends with the connection
ends cleanly only on a FIN, never on a reset; a connection goes back to the pool only when its
answer was read to the end and nothing followed it, expires there after `keepalive_expiry` (or the
server's Keep-Alive timeout) and is dropped if it hears anything while idle; a silent reused
connection is retried once on a new one; a connect that is refused or times out tries the next
address.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

# Above this much unread body, stop reading the socket until the relay catches up
# (backpressure from a slow client reaches the upstream's TCP window).
_HIGH_WATER = 256 * 1024
_DNS_TTL = 10.0
# The response head (with any 1xx heads before it) is bounded as h11 bounds an incomplete event.
MAX_HEAD = 64 * 1024
# Bodies read whole (a non-streamed answer) are bounded by default by this much.
DEFAULT_MAX_BODY = 64 * 1024 * 1024
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|[,;\s])timeout\s*=\s*(\d+)", re.IGNORECASE)

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


class AnswerTimeout(Exception):
    """The head came in time, but not the rest of an answer that had to be whole by then."""


class IdleTimeout(Exception):
    """An open body went quiet for longer than the idle timeout."""


class FirstTextTimeout(Exception):
    """An open stream sent no text by the time its reader asked for (`Response.expect_text_by`)."""


class ProtocolError(Exception):
    """The server sent something that is not HTTP/1.1."""


class BodyTooLarge(ProtocolError):
    """A body read whole was larger than its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than {limit} bytes")
        self.limit = limit


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
    try:
        return Endpoint(parts.scheme, host, port, path.encode("ascii"), host_header.encode("idna"))
    except UnicodeError:  # a path that is not ASCII, an empty or over-long host label
        raise ValueError("not an http(s) URL with a host") from None


class _State(enum.Enum):
    """Where a connection is in its request/response exchange (named, as h11 does, rather than
    read off a handful of flags)."""

    IDLE = "idle"  # in the pool, between exchanges: any byte or EOF now means it is dead
    HEAD = "head"  # request sent, waiting for the final (non-1xx) head
    BODY = "body"  # the final head is in; reading the body
    DONE = "done"  # the answer was read to its end: the parser is at a message boundary


# Module names for the members: an Enum member looked up on its class costs about 70 ns in
# Python 3.11, a global about 10, and data_received asks several times per read.
_IDLE, _HEAD, _BODY, _DONE = _State.IDLE, _State.HEAD, _State.BODY, _State.DONE


class _Unsolicited(Exception):
    """Bytes after the end of the answer: the server is out of step, the connection is dead."""


class _NoCallbacks:
    """What a closed connection's parser reports to: nothing."""


# The parser a connection holds once closed. Its own parser holds the connection's bound methods
# (its callbacks), a reference cycle that only the garbage collector's full pass would free, with
# everything the connection holds; dropping it frees a closed connection at once.
_DETACHED = httptools.HttpResponseParser(_NoCallbacks())


def _head_too_large() -> ProtocolError:
    return ProtocolError(f"the response head is larger than {MAX_HEAD // 1024} KiB")


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one request at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle_timeout: float,
        key: tuple[str, str, int],
        live: set[_Connection] | None = None,
    ) -> None:
        self.key = key
        self._live = live  # the pool's open connections, counted for /metrics
        self._loop = loop
        self._idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_until = 0.0
        self._reset(_IDLE)

    def _reset(self, state: _State) -> None:
        self.state = state
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._head_bytes = 0  # whole reads while a head is unfinished (bounds what httptools buffers)
        self._header_bytes = 0  # header lines as parsed: exact, however the reads fell
        self._informational = False
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = False
        self.got_bytes = False
        self._error: BaseException | None = None
        self._paused = False
        self._last_data = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._answer_by: float | None = None
        self._sink: Callable[[bytes], bool] | None = None

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        if self._live is not None:
            self._live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_data = self._loop.time()
        state = self.state
        if state is _IDLE:
            self.close()  # a pooled connection that hears anything is dead (httpcore: is_readable)
            return
        if state is _HEAD:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            if not isinstance(cause, _Unsolicited):
                reason = cause if isinstance(cause, ProtocolError) else ProtocolError(f"invalid HTTP: {exc}")
                self._fail(reason)
            self.close()  # what is complete stays readable; the connection is not reused
            return
        if self.state is _HEAD and self._head_bytes > MAX_HEAD:
            # Counted over every 1xx head too, so an endless run of them is bounded as well.
            self._fail(_head_too_large())
            self.close()
            return
        if self._chunks:
            sink = self._sink
            waiter = self._waiter
            if (
                sink is not None
                and len(self._chunks) == 1  # nothing older is waiting to be read
                and self.state is _BODY
                and waiter is not None
                and not waiter.done()
            ):
                try:
                    taken = sink(self._chunks[0])
                except Exception as exc:  # noqa: BLE001  # raised to the reader, as a Future does
                    self._chunks.clear()
                    self._fail(exc)
                    self.close()
                    return
                if taken:
                    self._chunks.clear()
                    self._buffered = 0
                    return
            # One wake-up per read, not per body piece the parser found in it.
            if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/1.1 has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._live is not None:
            self._live.discard(self)
        if self.state is _BODY and exc is None and self._error is None and self._until_close():
            self.on_message_complete()  # a body without length or chunking ends with the connection
        if self.state is not _DONE:
            # A reset (exc set, e.g. ECONNRESET) is never a clean end, whatever the framing.
            reason = "was reset" if exc is not None else "was closed before the answer was complete"
            self._fail(TransportError(f"the connection {reason}", before_response=not self.got_bytes))
        self._cancel_timers()
        self._parser = _DETACHED  # nothing more arrives: see _DETACHED

    def pause_writing(self) -> None:  # request bodies are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    def _until_close(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.state is _DONE:
            raise _Unsolicited  # stops the parser: nothing after the answer is taken as part of it

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is not _HEAD:
            return  # after the head come only trailers, which are not kept
        # Counted here as well as per read: a head that completes within the read that brings
        # it (as a 72 KiB head sent in one write does) never looks unfinished after a read.
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEAD:
            raise _head_too_large()
        name = name.lower()
        if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # A coded body (gzip, chunked) would be relayed as its raw bytes; h11 refuses it too.
            raise ProtocolError("a Transfer-Encoding other than chunked")
        self.headers.append((name, value.rstrip(b" \t")))  # trailing whitespace is not the value's

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101 or status < 100:
                raise ProtocolError(f"the server answered status {status}")
            self._informational = True  # 100 Continue, 102, 103 Early Hints: not the answer
            self.headers = []
            return
        self.status = status
        # Asked now: httptools forgets it once the message is complete.
        self.keep_alive = self._parser.should_keep_alive()
        self.state = _BODY
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            if self._answer_by is not None:
                self._deadline = self._loop.call_at(self._answer_by, self._deadline_passed)
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.state = _DONE
        self._cancel_timers()
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

    def send(self, data: bytes, head_by: float, answer_by: float | None) -> None:
        """Write a request; the head must arrive by `head_by` (loop time), and the whole answer
        by `answer_by` when it is set."""
        assert self.transport is not None and self.state is _IDLE
        self.state = _HEAD  # fields are fresh: from __init__ or recycle()
        self.transport.write(data)
        # Bare timer handles: asyncio.timeout() costs several times more per request.
        self._deadline = self._loop.call_at(head_by, self._deadline_passed)
        self._answer_by = answer_by

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.state is _HEAD:
            self._fail(FirstByteTimeout())
        elif self.state is _BODY:
            self._fail(AnswerTimeout())

    def expect_text_by(self, when: float) -> None:
        """Fail the open stream with `FirstTextTimeout` at `when` (loop time) unless
        `text_arrived` is called first. A bare timer handle, as for the head's deadline: an
        `asyncio.timeout` around each read before the first text cost several times more."""
        if self.state is _BODY and self._deadline is None:
            self._deadline = self._loop.call_at(when, self._text_late)

    def text_arrived(self) -> None:
        if self.state is _BODY and self._answer_by is None and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _text_late(self) -> None:
        self._deadline = None
        self._fail(FirstTextTimeout())

    def start_idle_timer(self) -> None:
        if self.state is not _BODY:
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

    def _cancel_timers(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def pump(self, sink: Callable[[bytes], bool] | None) -> None:
        """Offer each read to `sink` as it arrives, while the reader waits in `read()` with nothing
        unread; a read the sink takes (True) is not queued, so the reader does not wake up for it.
        What the sink declines, and the end, an error or a timeout, reach the reader as before, in
        order. The sink runs inside `data_received`: it must not block, and what it raises is
        raised to the reader. `pump(None)` stops it; so does the end of the exchange."""
        self._sink = sink

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
            if self.state is _DONE:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def reusable(self) -> bool:
        return self.state is _DONE and self.keep_alive and not self.closed and self._error is None

    def recycle(self, idle_until: float) -> None:
        """Back to the pool: a fresh parser at a message boundary, usable until `idle_until`."""
        self._cancel_timers()
        self._reset(_IDLE)
        self.idle_until = idle_until

    def close(self) -> None:
        self._cancel_timers()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class Response:
    """An answer whose head has arrived; read the body on a hot path with
    `while (chunk := await response.next_chunk()) is not None` (no generator), or whole with
    `read()`."""

    __slots__ = ("_conn", "_max_body", "_pool", "_released", "headers", "next_chunk", "status")

    def __init__(self, pool: Pool, conn: _Connection, max_body: int) -> None:
        self._pool = pool
        self._conn = conn
        self._max_body = max_body
        self.next_chunk = conn.read  # everything received since the last call; None at the end
        self._released = False
        self.status = conn.status
        self.headers = conn.headers

    def expect_text_by(self, when: float) -> None:
        """Fail this stream's reads with `FirstTextTimeout` at `when` (loop time), unless
        `text_arrived()` comes first: a stream that stalls before its first text (failover.py)."""
        self._conn.expect_text_by(when)

    def text_arrived(self) -> None:
        self._conn.text_arrived()

    def pump(self, sink: Callable[[bytes], bool] | None) -> None:
        """Relay reads from the connection's callback while the reader waits (`_Connection.pump`):
        a relayed event then costs no task switch."""
        self._conn.pump(sink)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self, limit: int | None = None, *, truncate: bool = False) -> bytes:
        """The rest of the body. Past `limit` bytes (default: the pool's `max_body_bytes`) it
        raises `BodyTooLarge`, or with `truncate` returns the first `limit` bytes; either way it
        stops reading there, so no more than about one read beyond the limit is ever held, and
        the connection is dropped on release."""
        limit = self._max_body if limit is None else limit
        parts: list[bytes] = []
        size = 0
        read = self._conn.read
        while (chunk := await read()) is not None:
            if size + len(chunk) > limit:
                if not truncate:
                    raise BodyTooLarge(limit)
                parts.append(chunk[: limit - size])
                break
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read to the end, else close it
        (so the upstream stops generating an answer nobody reads)."""
        if self._released:
            return
        self._released = True
        self._conn.pump(None)
        self._pool._give_back(self._conn)


class Pool:
    """Keep-alive connections per (scheme, host, port); a connection carries one request at a time.

    Like httpcore's pool: an idle connection expires after `keepalive_expiry` seconds (or the
    server's `Keep-Alive: timeout=N`, when smaller), and one that heard anything while idle (bytes
    or EOF) is closed rather than reused."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        connect_timeout: float,
        idle_timeout: float,
        keepalive_expiry: float = 5.0,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        max_idle_per_host: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._keepalive_expiry = keepalive_expiry
        self._max_body = max_body_bytes
        self._max_idle = max_idle_per_host
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._closed = False
        self._live: set[_Connection] = set()

    async def request(
        self,
        url: str,
        headers: bytes,
        body: bytes,
        *,
        first_byte_timeout: float,
        whole_answer: bool = False,
        method: bytes = b"POST",
    ) -> Response:
        """Send a request (`headers` are pre-encoded lines, each ending CRLF) and wait for the head.
        A GET sends no body and no Content-Length. With `whole_answer`, `first_byte_timeout` bounds
        the whole answer, head and body, as one deadline (then `AnswerTimeout` while reading).

        A pooled connection found closed on sending is retried once on a new one. So is a reused
        one that stays silent on a streamed request: it gets half the budget for its head, and if
        not one byte came, a new connection gets the rest (a keep-alive socket can die without a
        FIN, and that is not the upstream's fault until a fresh connection also times out). A
        `whole_answer` request is not re-sent for silence: its head comes only when the answer is
        ready, so silence is expected, and sending it again would have it generated twice."""
        where = endpoint(url)
        length = b"" if method == b"GET" else b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        head = (
            method + b" " + where.target + b" HTTP/1.1\r\nHost: " + where.host_header + b"\r\n"
            + headers + length + b"\r\n"
        )  # fmt: skip
        if method == b"GET":
            body = b""
        loop = asyncio.get_running_loop()
        deadline = 0.0
        for attempt in (0, 1):
            conn, reused = await self._acquire(where)
            if attempt == 0:
                deadline = loop.time() + first_byte_timeout
            retry = reused and attempt == 0
            retry_silent = retry and not whole_answer
            head_by = (loop.time() + deadline) / 2 if retry_silent else deadline
            conn.send(head + body, head_by, deadline if whole_answer else None)
            try:
                await conn.head
            except FirstByteTimeout:
                conn.close()
                if retry_silent and not conn.got_bytes:
                    continue
                raise
            except TransportError as exc:
                conn.close()
                if retry and exc.before_response:
                    continue  # a stale keep-alive connection: the request never reached a server
                raise
            except BaseException:
                conn.close()
                raise
            conn.start_idle_timer()
            return Response(self, conn, self._max_body)
        raise AssertionError("unreachable")

    async def _acquire(self, where: Endpoint) -> tuple[_Connection, bool]:
        idle = self._idle.get(where.key)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()  # the most recently used: the likeliest to be alive
                if conn.closed or conn.idle_until <= now or conn.transport is None or conn.transport.is_closing():
                    conn.close()
                    continue
                return conn, True
        return await self._connect(where), False

    async def _connect(self, where: Endpoint) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = await self._addresses(where.host, where.port)
        ssl_context = self._ssl_context() if where.scheme == "https" else None
        # One budget for all addresses; each gets an even share of what is left (as curl does),
        # so a black-holed first address leaves time for the next.
        deadline = loop.time() + self._connect_timeout
        last: OSError | None = None
        timed_out = False
        for index, address in enumerate(addresses):
            share = (deadline - loop.time()) / (len(addresses) - index)
            try:
                async with asyncio.timeout(share):
                    _transport, conn = await loop.create_connection(
                        lambda: _Connection(loop, self._idle_timeout, where.key, self._live),
                        address,
                        where.port,
                        ssl=ssl_context,
                        server_hostname=where.host if ssl_context else None,
                    )
                return conn
            except TimeoutError:
                timed_out = True
            except OSError as exc:
                last = exc
        if timed_out and last is None:
            raise ConnectTimeout(self._connect_timeout)
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
        now = asyncio.get_running_loop().time()
        expiry = self._keepalive_expiry
        for name, value in conn.headers:
            if name == b"keep-alive" and (found := _KEEP_ALIVE_TIMEOUT.search(value)):
                expiry = min(expiry, float(found[1]))
        idle = self._idle.setdefault(conn.key, collections.deque())
        while idle and (idle[0].closed or idle[0].idle_until <= now):
            idle.popleft().close()  # the oldest first: expired or gone while nobody asked
        if expiry <= 0 or len(idle) >= self._max_idle:
            conn.close()
            return
        conn.recycle(now + expiry)
        idle.append(conn)

    def counts(self) -> tuple[int, int]:
        """Connections open and, of those, idle in the pool (read when /metrics is scraped)."""
        return len(self._live), sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
