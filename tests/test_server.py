"""The contract of chatgate's uvicorn protocol subclass (`server.py`), in-process: a mock transport,
the protocol fed bytes, bytes out (the shape of uvicorn's own tests/protocols/test_http.py).

These are the behaviours that depend on uvicorn internals; run them before widening the uvicorn
range in pyproject.toml and `server.TESTED_UVICORN`."""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from tests.support.garbage import cyclic_garbage
from tests.support.mock_transport import MockTransport
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from chatgate.api.asgi import (
    ABORT_EXTENSION,
    BODY_TIMEOUT_EXTENSION,
    DISCONNECT_EXTENSION,
    WRITE_EXTENSION,
    Receive,
    Scope,
    Send,
    abort_response,
    body_writer,
)
from chatgate.server import MAX_HEAD_BYTES, TESTED_UVICORN, GuardedHttpToolsProtocol, uvicorn_problem

ASGIApp = Callable[[Scope, Receive, Send], Any]


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers `<method> <path> <body length>`, having read the whole body."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = f"{scope['method']} {scope['path']} {size}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Connection:
    """One protocol instance on a mock transport, inside a running loop."""

    def __init__(self, app: ASGIApp = echo_length, *, head_timeout: float = 30.0) -> None:
        config = Config(app=app, lifespan="off", log_config=None, access_log=False)
        config.load()
        cls = type("TestProtocol", (GuardedHttpToolsProtocol,), {"head_timeout": head_timeout})
        self.protocol = cls(config=config, server_state=ServerState(), app_state={})
        self.transport = MockTransport()
        self.protocol.connection_made(self.transport)

    def feed(self, data: bytes, read_size: int | None = None) -> None:
        """Hand `data` to the protocol in reads of `read_size` bytes (one read by default)."""
        step = read_size or len(data) or 1
        for start in range(0, len(data), step):
            if self.transport.closed:
                return
            self.protocol.data_received(data[start : start + step])

    async def responses(self, count: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """The next `count` complete responses (status, body), waiting for the app to write them."""
        async with asyncio.timeout(timeout):
            while True:
                parsed = parse_responses(self.transport.buffer)
                if len(parsed) >= count:
                    self.transport.take()
                    return parsed
                await asyncio.sleep(0.001)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.transport.closed:
                await asyncio.sleep(0.005)

    def lose(self) -> None:
        self.protocol.connection_lost(None)


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    """Complete content-length responses at the start of `data` (what these tests' apps send)."""
    found: list[tuple[int, bytes]] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return found
        head = data[:end].decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = re.search(r"(?im)^content-length: *(\d+)", head)
        if length is None:
            return found  # chunked: parsed by the test itself
        size = int(length.group(1))
        body = data[end + 4 : end + 4 + size]
        if len(body) < size:
            return found
        found.append((status, body))
        data = data[end + 4 + size :]


def request(path: str = "/", body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: chatgate", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head_of_size(size: int) -> bytes:
    """A GET head of exactly `size` bytes on the wire, padded by one header."""
    base = b"GET /pad HTTP/1.1\r\nhost: chatgate\r\nx-pad: \r\n\r\n"
    head = base.replace(b"x-pad: ", b"x-pad: " + b"a" * (size - len(base)))
    assert len(head) == size
    return head


def run(main: Callable[[], Any]) -> None:
    asyncio.run(main())


# ----- bodies and keep-alive ------------------------------------------------------------------


@pytest.mark.parametrize("read_size", [1024, 100 * 1024, 256 * 1024])
def test_keep_alive_after_a_large_body_in_many_reads(read_size: int) -> None:
    """The read that completes a body is not counted as the next head (it was: 431 on the next
    request, or on this one's keep-alive successor, for bodies > 64 KiB)."""

    async def main() -> None:
        conn = Connection()
        body = b"x" * (3 * 1024 * 1024 + 17)
        for _ in range(3):
            conn.feed(request("/big", body), read_size)
            assert await conn.responses(1) == [(200, b"POST /big %d" % len(body))]
        conn.feed(request("/small", b"{}"))
        assert await conn.responses(1) == [(200, b"POST /small 2")]
        assert not conn.transport.closed
        conn.lose()

    run(main)


def test_a_read_that_ends_a_body_and_begins_the_next_head() -> None:
    async def main() -> None:
        conn = Connection()
        body = b"y" * (200 * 1024)
        stream = request("/a", body) + request("/b", body) + request("/c", b"")
        conn.feed(stream, 150 * 1024)
        assert await conn.responses(3) == [
            (200, b"POST /a %d" % len(body)),
            (200, b"POST /b %d" % len(body)),
            (200, b"POST /c 0"),
        ]
        conn.lose()

    run(main)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        conn = Connection()
        conn.feed(request("/1", b"a") + request("/2", b"bb") + request("/3", b"ccc"))
        assert await conn.responses(3) == [(200, b"POST /1 1"), (200, b"POST /2 2"), (200, b"POST /3 3")]
        conn.lose()

    run(main)


# ----- the head limit -------------------------------------------------------------------------


@pytest.mark.parametrize("read_size", [None, 1000, 4096])
def test_a_head_of_exactly_the_limit_is_accepted(read_size: int | None) -> None:
    async def main() -> None:
        conn = Connection()
        conn.feed(head_of_size(MAX_HEAD_BYTES), read_size)
        assert await conn.responses(1) == [(200, b"GET /pad 0")]
        # And the connection is still good for the next one.
        conn.feed(head_of_size(MAX_HEAD_BYTES), read_size)
        assert await conn.responses(1) == [(200, b"GET /pad 0")]
        conn.lose()

    run(main)


@pytest.mark.parametrize("read_size", [None, 1000, 4096, 1])
def test_one_byte_over_the_limit_is_refused_with_431(read_size: int | None) -> None:
    async def main() -> None:
        conn = Connection()
        head = head_of_size(MAX_HEAD_BYTES + 1)
        if read_size == 1:
            head = head[-3000:]  # byte by byte is slow: a head already 1 byte over, its end fed slowly
            conn.feed(head_of_size(MAX_HEAD_BYTES + 1)[:-3000])
        conn.feed(head, read_size)
        await conn.wait_closed()
        (response,) = parse_responses(conn.transport.buffer)
        assert response[0] == 431
        assert b"larger than the limit of 65536 bytes" in response[1]

    run(main)


def test_a_long_target_counts_towards_the_head() -> None:
    async def main() -> None:
        conn = Connection()
        conn.feed(b"GET /" + b"t" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nhost: chatgate\r\n\r\n", 8192)
        await conn.wait_closed()
        assert parse_responses(conn.transport.buffer)[0][0] == 431

    run(main)


def test_a_header_that_never_ends_is_refused_while_it_arrives() -> None:
    """A header still incomplete is buffered by the parser: the bytes read bound it."""

    async def main() -> None:
        conn = Connection()
        conn.feed(b"GET / HTTP/1.1\r\nx-endless: " + b"e" * (MAX_HEAD_BYTES + 10), 4096)
        await conn.wait_closed()
        assert parse_responses(conn.transport.buffer)[0][0] == 431

    run(main)


# ----- slow clients ---------------------------------------------------------------------------


def test_a_slow_head_is_answered_408() -> None:
    async def main() -> None:
        conn = Connection(head_timeout=0.2)
        conn.feed(b"GET / HTTP/1.1\r\nhost: ")
        await conn.wait_closed()
        (response,) = parse_responses(conn.transport.buffer)
        assert response[0] == 408
        assert b"Request headers not received within 0.2 s" in response[1]

    run(main)


def test_a_connection_that_never_asks_is_closed_without_an_answer() -> None:
    async def main() -> None:
        conn = Connection(head_timeout=0.2)
        await conn.wait_closed()
        assert conn.transport.buffer == b""

    run(main)


def test_a_stalled_body_is_answered_408() -> None:
    async def main() -> None:
        conn = Connection(head_timeout=0.2)
        conn.feed(b"POST / HTTP/1.1\r\nhost: chatgate\r\ncontent-length: 10\r\n\r\nabc")
        await conn.wait_closed()
        (response,) = parse_responses(conn.transport.buffer)
        assert response[0] == 408
        assert b"Request body stalled" in response[1]

    run(main)


def test_a_body_that_keeps_coming_is_not_stalled() -> None:
    async def main() -> None:
        conn = Connection(head_timeout=0.2)
        conn.feed(b"POST / HTTP/1.1\r\nhost: chatgate\r\ncontent-length: 6\r\n\r\n")
        for part in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.12)  # each pause shorter than the timeout, the whole longer
            conn.feed(part)
        assert await conn.responses(1) == [(200, b"POST / 6")]
        conn.lose()

    run(main)


# ----- extensions -----------------------------------------------------------------------------


def test_extensions_are_merged_into_what_uvicorn_puts_there(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    original = HttpToolsProtocol.on_message_begin

    def with_extensions(self: HttpToolsProtocol) -> None:
        original(self)
        self.scope["extensions"] = {"http.response.trailers": {}}  # type: ignore[typeddict-unknown-key]

    monkeypatch.setattr(HttpToolsProtocol, "on_message_begin", with_extensions)

    final_extensions: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(scope["extensions"]))
        await echo_length(scope, receive, send)
        final_extensions.update(scope["extensions"])

    async def main() -> None:
        conn = Connection(app)
        conn.feed(request())
        await conn.responses(1)
        conn.lose()

    run(main)
    (extensions,) = seen
    assert {"http.response.trailers", DISCONNECT_EXTENSION, BODY_TIMEOUT_EXTENSION} <= set(extensions)
    # Set with the head, for the request whose response they write or end.
    assert {ABORT_EXTENSION, WRITE_EXTENSION} <= set(final_extensions)


async def aborting_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})  # chunked
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    abort_response(scope)


def test_an_aborted_response_ends_the_connection_without_an_error_log(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        conn = Connection(aborting_app)
        conn.feed(request())
        await conn.wait_closed()
        await asyncio.sleep(0.01)  # the app task returns after the abort
        conn.lose()
        return conn.transport.buffer

    caplog.set_level(logging.DEBUG)
    received: bytes = asyncio.run(main())
    assert received.endswith(b"7\r\npartial\r\n")  # never the last chunk: the client sees it cut short
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_without_the_abort_uvicorn_logs_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """The oracle for the test above: what the extension saves the log from."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await aborting_app({k: v for k, v in scope.items() if k != "extensions"}, receive, send)

    async def main() -> None:
        conn = Connection(app)
        conn.feed(request())
        await conn.wait_closed()
        conn.lose()

    run(main)
    assert "ASGI callable returned without completing response." in caplog.text


def test_abort_after_a_complete_response_does_nothing() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await echo_length(scope, receive, send)
        abort_response(scope)

    async def main() -> None:
        conn = Connection(app)
        conn.feed(request("/1") + request("/2"))
        assert await conn.responses(2) == [(200, b"POST /1 0"), (200, b"POST /2 0")]
        assert not conn.transport.closed
        conn.lose()

    run(main)


def test_answered_requests_leave_no_reference_cycles() -> None:
    # The extensions reach the cycle weakly: each request made a cycle of ~14 objects before.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await chunked_app([b"a", b"b"], {1})(scope, receive, send)
        abort_response(scope)  # after the end: does nothing, but looks the cycle up

    async def main() -> None:
        conn = Connection(app)
        with cyclic_garbage() as garbage:
            for n in range(50):
                conn.feed(request(f"/{n}"))
                async with asyncio.timeout(5):
                    while not conn.transport.buffer.endswith(b"0\r\n\r\n"):
                        await asyncio.sleep(0.001)
                conn.transport.take()
        assert garbage.count < 50, f"{garbage.count} objects in cycles after 50 requests"
        conn.lose()

    run(main)


def chunked_app(pieces: list[bytes], written: set[int]) -> ASGIApp:
    """Streams `pieces` as a chunked body: those whose index is in `written` through the write
    extension, the others through `send`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        write = body_writer(scope)
        assert write is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i, piece in enumerate(pieces):
            if not (i in written and write(piece)):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def wire(app: ASGIApp) -> bytes:
    async def main() -> bytes:
        conn = Connection(app)
        conn.feed(request())
        async with asyncio.timeout(5):
            while not conn.transport.buffer.endswith(b"0\r\n\r\n"):
                await asyncio.sleep(0.001)
        conn.lose()
        return conn.transport.buffer

    return asyncio.run(main())


@pytest.mark.parametrize("written", [set(), {0, 1, 2, 3, 4}, {1, 3}, {0, 4}])
def test_the_write_extension_puts_on_the_wire_what_send_would(written: set[int]) -> None:
    """The oracle is uvicorn's own `send`: the same pieces, however they are split between the
    two, give the same bytes (chunk sizes in hex, a 1-byte and a 4 KiB piece, UTF-8)."""
    pieces = [b"a", b"x" * 4096, "h\u00e9llo \u2014 \U0001f600".encode(), b"\r\n0\r\n\r\n", b"z" * 255]
    assert wire(chunked_app(pieces, written)) == wire(chunked_app(pieces, set()))


def test_the_write_extension_declines_whenever_send_must_write() -> None:
    """Nothing is written when it returns False: before the head, with a Content-Length body,
    an empty piece, a client paused for writing, after the end, after the client left."""
    answers: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        write = body_writer(scope)
        assert write is not None
        answers.append(write(b"too early"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        answers.append(write(b""))
        protocol.pause_writing()
        answers.append(write(b"paused"))
        protocol.resume_writing()
        answers.append(write(b"ok"))
        await send({"type": "http.response.body", "body": b""})
        answers.append(write(b"after the end"))

    protocol: Any = None

    async def main() -> bytes:
        nonlocal protocol
        conn = Connection(app)
        protocol = conn.protocol
        conn.feed(request())
        async with asyncio.timeout(5):
            while len(answers) < 5:
                await asyncio.sleep(0.001)
        conn.lose()
        return conn.transport.buffer

    received = asyncio.run(main())
    assert answers == [False, False, False, True, False]
    assert received.endswith(b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert b"paused" not in received and b"too early" not in received and b"after the end" not in received


def test_the_write_extension_declines_a_body_with_a_length_and_a_client_that_left() -> None:
    answers: list[bool] = []
    left = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        write = body_writer(scope)
        assert write is not None
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        answers.append(write(b"abcd"))  # not chunked: `send` counts the length
        await send({"type": "http.response.body", "body": b"abcd"})

    async def chunked(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        write = body_writer(scope)
        assert write is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await left.wait()
        answers.append(write(b"nobody reads this"))

    async def main() -> tuple[bytes, bytes]:
        first = Connection(app)
        first.feed(request())
        assert await first.responses(1) == [(200, b"abcd")]
        first.lose()
        second = Connection(chunked)
        second.feed(request())
        await asyncio.sleep(0.01)
        second.lose()
        left.set()
        async with asyncio.timeout(5):
            while len(answers) < 2:
                await asyncio.sleep(0.001)
        return first.transport.buffer, second.transport.buffer

    _, second_wire = asyncio.run(main())
    assert answers == [False, False]
    assert b"nobody" not in second_wire


# ----- the uvicorn range ----------------------------------------------------------------------


def test_the_installed_uvicorn_is_in_the_tested_range() -> None:
    assert uvicorn_problem() is None, uvicorn.__version__


@pytest.mark.parametrize("version", ["0.53.9", "0.55.0", "1.0.0", "unknown"])
def test_a_uvicorn_outside_the_range_is_named(version: str) -> None:
    problem = uvicorn_problem(version)
    assert problem is not None
    assert f"uvicorn {version} is installed" in problem
    assert "uvicorn[standard]>=0.54,<0.55" in problem


def test_the_pin_in_pyproject_is_the_tested_range() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("uvicorn")]
    (low, high) = TESTED_UVICORN
    assert pin.endswith(f">={low[0]}.{low[1]},<{high[0]}.{high[1]}")


def test_serve_refuses_an_untested_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from chatgate.cli import app

    monkeypatch.setattr(uvicorn, "__version__", "0.99.1")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "uvicorn 0.99.1 is installed" in result.output
    assert "tested with uvicorn>=0.54,<0.55 only" in " ".join(result.output.split())
