"""uvicorn's httptools protocol with the two limits it lacks for a server facing the Internet,
and a cheap way for a chat to hear that its client left.

uvicorn (0.54, httptools) buffers a request head of any size and waits for it forever: one
client could send gigabytes of headers, or open connections and trickle bytes (slowloris).
This subclass refuses a head larger than `max_head_bytes` with 431, and a head or a body that
makes no progress for `head_timeout` seconds with 408, closing the connection either way. Body
sizes are bounded in the application (`api.asgi.BodyLimit`, `read_body`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatgate.api.asgi import BODY_TIMEOUT_EXTENSION, DISCONNECT_EXTENSION, DisconnectSignal
from chatgate.config import Settings

MAX_HEAD_BYTES = 64 * 1024


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """An httptools protocol that bounds the size of, and the time spent on, each request head."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_done = False
        self._heads = 0  # heads completed on this connection
        self._head_size = 0  # bytes of the current head, as parsed
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_last = 0.0
        self._body_open = False  # a head is in, its body is not

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
        self._head_size = 0
        # Lets a chat learn that its client left without a task waiting on receive() (api/asgi.py).
        # And tells read_body() that this protocol bounds a stalled body, so it need not.
        extensions: Any = {DISCONNECT_EXTENSION: DisconnectSignal(), BODY_TIMEOUT_EXTENSION: True}
        self.scope["extensions"] = extensions

    def data_received(self, data: bytes) -> None:
        if not self._head_done:
            self._arm_head_timer()
        heads = self._heads
        super().data_received(data)
        if self._body_open:
            # Most bodies come whole with their head and never get here; a slow one gets one timer,
            # pushed on by each read (not re-created per read).
            self._body_last = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_at(self._body_last + self.head_timeout, self._body_check)
        # Counted after parsing, and only when no head completed in this read: a read that
        # completes a head (and carries body bytes after it) is not an oversized head.
        if heads == self._heads and not self._head_done and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, f"Request headers are larger than the limit of {self.max_head_bytes} bytes")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
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
        self._head_done = True
        self._heads += 1
        self._body_open = True
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_open = False
        self._cancel_body_timer()
        super().on_message_complete()
        # What arrives next on this connection is the next request's head.
        self._head_done = False
        self._head_bytes = 0

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
        if self._head_bytes:
            self._refuse(408, f"Request headers not received within {self.head_timeout:g} s")
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        self._body_timer = None
        if not self._body_open or self.transport.is_closing():
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
