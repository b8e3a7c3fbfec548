"""How chatgate runs uvicorn: its httptools protocol with the limits it lacks for a server facing
the Internet, and its `Server` with a drain before shutting down.

uvicorn (httptools) buffers a request head of any size and waits for it forever: one client
could send gigabytes of headers, or open connections and trickle bytes (slowloris). The protocol
refuses a head larger than `max_head_bytes` with 431, and a head or a body that makes no progress
for `head_timeout` seconds with 408, closing the connection either way. Body sizes are bounded in
the application (`api.asgi.BodyLimit`, `read_body`). It also gives each request two extensions:
a cheap way to hear that the client left (`DisconnectSignal`) and a way to end a response on
purpose, incomplete (`ABORT_EXTENSION`).

Both classes use uvicorn internals (parser callbacks, `RequestResponseCycle` fields, `Server`
hooks), so `serve` refuses a uvicorn outside `TESTED_UVICORN`; `tests/test_server.py` is the
contract to run before widening that range.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import socket
import weakref
from collections.abc import Callable, Coroutine
from functools import partial
from types import FrameType
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from chatgate.api.asgi import (
    ABORT_EXTENSION,
    BODY_TIMEOUT_EXTENSION,
    DISCONNECT_EXTENSION,
    WRITE_EXTENSION,
    DisconnectSignal,
)
from chatgate.config import Settings

log = logging.getLogger("chatgate")

MAX_HEAD_BYTES = 64 * 1024
# The uvicorn releases this module was tested with, [low, high): keep in step with pyproject.toml.
TESTED_UVICORN = ((0, 54), (0, 55))
# What a head costs besides its target and headers: the method's space, " HTTP/1.1\r\n" and the
# blank line; with ": " and CRLF per header, the count is the head's size on the wire.
_REQUEST_LINE_EXTRA = 1 + len(b" HTTP/1.1\r\n") + 2
_HEADER_EXTRA = len(b": \r\n")


def uvicorn_problem(version: str | None = None) -> str | None:
    """Why this uvicorn (the installed one by default) cannot be trusted with chatgate's protocol
    subclass, or None."""
    version = uvicorn.__version__ if version is None else version
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        found = ()
    low, high = TESTED_UVICORN
    if len(found) == 2 and low <= found < high:
        return None
    tested = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    return (
        f"uvicorn {version} is installed, but chatgate's server extends uvicorn internals and was "
        f"tested with uvicorn{tested} only: install that (pip install 'uvicorn[standard]{tested}')"
    )


class _Phase(enum.Enum):
    """Where a connection is in the request it is reading."""

    IDLE = "idle"  # between requests: nothing of the next head has arrived
    HEAD = "head"  # a head is arriving
    BODY = "body"  # the head is in, the body is not


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused."""


# The request's extensions reach its cycle through a weak reference: the scope is the cycle's, so a
# strong one would make each request a reference cycle (about 14 objects) that only the garbage
# collector frees, and a stream that lives a few seconds leaves it in the oldest generation, where
# every full collection scans it. The app holds the cycle's `send` for as long as it can call these.
_CycleRef = weakref.ReferenceType[RequestResponseCycle]


def _abort(cycle_ref: _CycleRef) -> None:
    """End the cycle's response incomplete, on purpose: the client sees the connection close."""
    cycle = cycle_ref()
    if cycle is None or cycle.response_complete:
        return
    # uvicorn then takes the app's return for what it is, not as a bug to log at ERROR.
    cycle.disconnected = True
    cycle.transport.close()


def _write_now(cycle_ref: _CycleRef, body: bytes) -> bool:
    """Write one non-empty piece of a started chunked body as uvicorn's `send` would, but at
    once; False, writing nothing, whenever `send` must do it: the response not started or
    finished, not chunked, the client gone, or its connection paused for writing (`send` waits)."""
    cycle = cycle_ref()
    if (
        cycle is None
        or cycle.flow.write_paused
        or cycle.disconnected
        or cycle.response_complete
        or not cycle.response_started
        or cycle.chunked_encoding is not True
        or not body
    ):
        return False
    cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
    return True


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """An httptools protocol that bounds the size of, and the time spent on, each request head."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.IDLE
        self._heads = 0  # heads completed on this connection
        self._head_size = 0  # bytes of the current head, as parsed: exact whatever the reads
        self._head_read = 0  # bytes read of the current head while it is still arriving
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_last = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # also bounds a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            extensions: dict[str, Any] = cycle.scope.get("extensions") or {}
            signal = extensions.get(DISCONNECT_EXTENSION)
            if isinstance(signal, DisconnectSignal):
                signal.fire()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEAD
        self._head_size = 0
        self._head_read = 0
        # Merged, not replaced: a later uvicorn may put its own extensions here.
        scope: Any = self.scope
        extensions = scope.get("extensions")
        if extensions is None:
            extensions = scope["extensions"] = {}
        # Lets a chat learn that its client left without a task waiting on receive() (api/asgi.py).
        extensions[DISCONNECT_EXTENSION] = DisconnectSignal()
        # Tells read_body() that this protocol bounds a stalled body, so it need not.
        extensions[BODY_TIMEOUT_EXTENSION] = True

    def data_received(self, data: bytes) -> None:
        before = self._phase
        if before is not _Phase.BODY:
            self._arm_head_timer()
        heads = self._heads
        super().data_received(data)
        phase = self._phase
        if phase is _Phase.BODY:
            # Most bodies come whole with their head and never get here; a slow one gets one timer,
            # pushed on by each read (not re-created per read).
            self._body_last = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_at(self._body_last + self.head_timeout, self._body_check)
        elif phase is _Phase.HEAD and before is not _Phase.BODY and heads == self._heads:
            # The whole read belongs to a head that is still arriving: count it as read, which
            # also bounds what the parser buffers of a header not yet complete. A read that began
            # in a body, or completed a head, holds bytes of another part: the parsed count
            # (`_count`) covers the head bytes in those.
            if self.transport.is_closing():
                return
            self._head_read += len(data)
            if self._head_read > self.max_head_bytes:
                self._refuse(431, f"Request headers are larger than the limit of {self.max_head_bytes} bytes")

    def on_url(self, url: bytes) -> None:
        extra = 0 if self.url else len(self.parser.get_method()) + _REQUEST_LINE_EXTRA
        self._count(len(url) + extra)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + _HEADER_EXTRA)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        """Count parsed head bytes (exact, even when a whole head arrives in one read)."""
        self._head_size += size
        if self._head_size > self.max_head_bytes:
            self._refusal = (431, f"Request headers are larger than the limit of {self.max_head_bytes} bytes")
            raise _HeadRefused  # stops the parser; uvicorn then calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._phase = _Phase.BODY
        self._heads += 1
        self._cancel_head_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not for an upgrade, which has no cycle
            extensions: Any = self.scope["extensions"]
            cycle_ref = weakref.ref(cycle)  # see _CycleRef
            extensions[ABORT_EXTENSION] = partial(_abort, cycle_ref)
            extensions[WRITE_EXTENSION] = partial(_write_now, cycle_ref)

    def on_message_complete(self) -> None:
        self._phase = _Phase.IDLE  # what arrives next on this connection is the next request's head
        self._cancel_body_timer()
        super().on_message_complete()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._phase is _Phase.HEAD:
            self._refuse(408, f"Request headers not received within {self.head_timeout:g} s")
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        self._body_timer = None
        if self._phase is not _Phase.BODY or self.transport.is_closing():
            return
        due = self._body_last + self.head_timeout
        if self.loop.time() < due:
            self._body_timer = self.loop.call_at(due, self._body_check)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app is still waiting for the body: answer for it; it then hears the client left.
            self._refuse(408, f"Request body stalled: nothing received for {self.head_timeout:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        body = orjson.dumps({"message": message})
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn should use for these settings."""
    return type("ChatgateHttpProtocol", (GuardedHttpToolsProtocol,), {"head_timeout": settings.client_timeout})


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How chatgate runs uvicorn, in the one process or in each worker of several."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_for(settings),  # httptools, with limits on request heads
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        server_header=False,
        # chatgate does not use the client's address; behind a proxy there is nothing to rewrite.
        proxy_headers=False,
        # After the drain (chats ended) only control-plane requests can be left to wait for.
        timeout_graceful_shutdown=5,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain: the first SIGTERM or SIGINT runs `drain` (the app lets its
    running chats finish, then ends the rest) while the server still serves, and only then does
    uvicorn's own shutdown begin. A second signal ends the process at once.

    A `worker` of `serve --workers N` (its number) heeds SIGTERM only: a Ctrl-C in a terminal
    sends SIGINT to the whole process group, and its supervisor passes it on as one SIGTERM."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], Coroutine[Any, Any, None]], *, worker: int | None = None
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_asked = False
        self._draining: asyncio.Task[None] | None = None
        self._worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it re-raises the signal after shutting down, so a clean drain would
        # still end the process by SIGTERM rather than with exit status 0.
        if self._worker is not None and sig == signal.SIGINT:
            return
        if self._drain_asked:
            log.warning("%s again: stopping now, without waiting for running chats", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        else:
            self._drain_asked = True  # a signal handler only sets flags; on_tick starts the drain

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._worker is not None:
            log.info("worker %d (pid %d) is serving", self._worker, os.getpid())

    async def on_tick(self, counter: int) -> bool:
        if self._drain_asked and self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        if self._draining is not None and self._draining.done():
            self.should_exit = True
            failure = None if self._draining.cancelled() else self._draining.exception()
            if failure is not None:
                log.error("the drain failed; shutting down now", exc_info=failure)
        return await super().on_tick(counter)
