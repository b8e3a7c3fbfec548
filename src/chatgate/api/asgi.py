"""Small pure-ASGI primitives for the hot path: read a bounded body, send JSON, watch for disconnect.

The chat endpoints are plain ASGI callables rather than framework routes: a framework's
request/response objects and middleware cost more CPU per streamed chunk than the relay itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from chatgate.errors import BadRequest, ChatgateError, PayloadTooLarge, RequestTimeout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (names are lower-case in ASGI)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None when absent; BadRequest when it is not a number."""
    length = header(scope, b"content-length")
    if length is None:
        return None
    try:
        return int(length)
    except ValueError:
        raise BadRequest("Content-Length is not a number") from None


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes")


async def receive_body_part(receive: Receive, stall: float | None) -> Message:
    """The next message of a body that is still arriving; RequestTimeout when the client stalls.

    uvicorn has no timeout of its own for a body that stops half-way (slowloris): without this
    a request would hold its task and connection until the client gives up."""
    if stall is None:
        return await receive()
    try:
        async with asyncio.timeout(stall):
            return await receive()
    except TimeoutError:
        raise RequestTimeout(f"Request body stalled: nothing received for {stall:g} s") from None


async def read_body(scope: Scope, receive: Receive, limit: int, *, stall: float | None = None) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed `limit`
    (and with 408 when it stalls for `stall` seconds)."""
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        raise too_large(limit)
    if stall is not None and server_bounds_body(scope):
        stall = None  # the server answers a stalled body itself, more cheaply than a timeout here
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive_body_part(receive, stall)
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The body as JSON whatever the Content-Type (chatbot-ui's browser sends none)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8 and nesting deeper than 1024 with this same error.
        raise BadRequest(f"Request body is not valid JSON: {exc.msg}") from None


async def send_json(send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ClientGone(Exception):
    """The client disconnected (stop button, closed tab); nothing more can be sent."""


DISCONNECT_EXTENSION = "chatgate.disconnect"
# Set by chatgate's server protocol, which answers a stalled body with 408 itself.
BODY_TIMEOUT_EXTENSION = "chatgate.body_timeout"
# A callable set by chatgate's server protocol: ends the response on purpose (`abort_response`).
ABORT_EXTENSION = "chatgate.abort"
# A callable set by chatgate's server protocol: `write(body) -> bool` writes one piece of a
# started response's body at once, from a callback, without a task switch; False (nothing
# written) when it must go through `send` instead (see `body_writer`).
WRITE_EXTENSION = "chatgate.write"

BodyWriter = Callable[[bytes], bool]


def body_writer(scope: Scope) -> BodyWriter | None:
    """The server's synchronous body writer, or None under a server that has none.

    A relay that writes each upstream event from the upstream connection's own callback (no task
    wakes up, no `send` coroutine runs) spends about a third less CPU per relayed event; `send`
    stays the way for everything else: the head, the end, a client that is slow to read."""
    extensions = scope.get("extensions")
    writer: BodyWriter | None = extensions.get(WRITE_EXTENSION) if extensions else None
    return writer


def abort_response(scope: Scope) -> None:
    """End a response that has started, incomplete and on purpose, so that the client can tell it
    was cut short (its body is never terminated) and the connection is not reused.

    chatgate's server closes the connection at once and without logging the return of an
    unfinished response as an application bug (uvicorn's "ASGI callable returned without
    completing response" ERROR): chatgate has logged why already. Under another ASGI server this
    does nothing: the app returns with the response unfinished, which servers also answer by
    closing the connection."""
    extensions = scope.get("extensions")
    abort = extensions.get(ABORT_EXTENSION) if extensions else None
    if abort is not None:
        abort()


def server_bounds_body(scope: Scope) -> bool:
    extensions = scope.get("extensions")
    return bool(extensions and extensions.get(BODY_TIMEOUT_EXTENSION))


class DisconnectSignal:
    """Put in a request's `scope["extensions"]` by chatgate's server protocol (`server.py`), which
    calls `fire()` when the connection is lost: a way to learn of a disconnect without keeping a
    task waiting on `receive()` for every request (that task was ~15% of a chat's CPU)."""

    __slots__ = ("callback", "fired")

    def __init__(self) -> None:
        self.fired = False
        self.callback: Callable[[], None] | None = None

    def fire(self) -> None:
        self.fired = True
        if self.callback is not None:
            self.callback()


class DisconnectWatch:
    """Cancels the current task when the client disconnects, so an upstream request that is
    waiting (for a slow or hung model) is closed at once rather than at the next write.

    Under chatgate's own server it listens to the connection (`DisconnectSignal`); under any other
    ASGI server it keeps a task waiting on `receive()` for `http.disconnect`."""

    __slots__ = ("_signal", "_task", "_watcher", "ending", "gone")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.gone = False
        self.ending = False  # cancelled by `end()`: the server is shutting down
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None
        extensions = scope.get("extensions")
        signal = extensions.get(DISCONNECT_EXTENSION) if extensions else None
        self._signal: DisconnectSignal | None = signal
        if signal is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        elif signal.fired:
            asyncio.get_running_loop().call_soon(self._gone)  # it left before we began listening
        else:
            signal.callback = self._gone

    def _gone(self) -> None:
        if self._task is not None and not (self.gone or self.ending):
            self.gone = True
            self._task.cancel()

    def end(self) -> None:
        """Cancel the chat the way a disconnect does, but as a failure: the server is shutting
        down (`absorb()` then says so with `ending`). Nothing happens once `stop()` was called."""
        if self._task is not None and not (self.gone or self.ending):
            self.ending = True
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone()
                return

    def stop(self) -> None:
        self._task = None  # nothing is cancelled from now on
        if self._signal is not None:
            self._signal.callback = None
        if self._watcher is not None:
            self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True (and the cancellation undone) if it was ours: a disconnect,
        or `end()` when `ending` is set."""
        if (self.gone or self.ending) and self._task is not None:
            self._task.uncancel()
            return True
        return False


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_DISCONNECT: Message = {"type": "http.disconnect"}


class BodyLimit:
    """Pure-ASGI guard for an app that reads bodies itself (the FastAPI control plane): 413 as
    soon as the declared or received size exceeds `limit`, 408 when the body stalls.

    The refusal is sent from inside `receive`; the app is then told the client left, and
    whatever it tries to answer after that is dropped: the client has its answer already.
    """

    def __init__(self, app: ASGIApp, limit: int, stall: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.stall = stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = declared_length(scope)
            if declared is not None and declared > self.limit:
                raise too_large(self.limit)
        except ChatgateError as exc:
            await send_json(send, exc.status, {"message": exc.message})
            return
        await _GuardedBody(self, receive, send, None if server_bounds_body(scope) else self.stall).run(scope)


class _GuardedBody:
    """One request's receive/send pair under a `BodyLimit`."""

    __slots__ = ("_limit", "_receive", "_send", "_stall", "body_done", "received", "refused", "started")

    def __init__(self, limit: BodyLimit, receive: Receive, send: Send, stall: float | None) -> None:
        self._limit = limit
        self._stall = stall
        self._receive = receive
        self._send = send
        self.received = 0
        self.body_done = False
        self.started = False
        self.refused = False

    async def run(self, scope: Scope) -> None:
        await self._limit.app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self.refused:
            return _DISCONNECT
        if self.body_done:
            return await self._receive()
        try:
            message = await receive_body_part(self._receive, self._stall)
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self._limit.limit:
                    raise too_large(self._limit.limit)
                self.body_done = not message.get("more_body", False)
            return message
        except ChatgateError as exc:
            if self.started:  # the app answered before reading its body: too late to refuse
                return _DISCONNECT
            self.refused = True
            await send_json(self._send, exc.status, {"message": exc.message})
            return _DISCONNECT

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
