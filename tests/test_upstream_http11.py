"""The hand-written upstream HTTP/1.1 client, against real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from tests.support.garbage import cyclic_garbage

from chatgate.upstream.http11 import (
    AnswerTimeout,
    BodyTooLarge,
    ConnectError,
    FirstByteTimeout,
    IdleTimeout,
    Pool,
    ProtocolError,
    TransportError,
    endpoint,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def loopback(addresses: list[str] | None = None) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, _port: int) -> list[str]:
        return addresses or [host]

    return resolve


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()  # not left closing when the loop ends

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_endpoint_parsing() -> None:
    where = endpoint("https://api.example.com/v1/chat/completions?x=1")
    assert (where.scheme, where.host, where.port) == ("https", "api.example.com", 443)
    assert where.target == b"/v1/chat/completions?x=1"
    assert where.host_header == b"api.example.com"
    assert endpoint("http://[::1]:8080/v1").host_header == b"[::1]:8080"
    with pytest.raises(ValueError):
        endpoint("ftp://example.com/")


def test_streamed_chunked_answer_and_keep_alive_reuse() -> None:
    connections = 0
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(chunked(b"data: a\n\n", b"data: b\n\n"))
            await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        for _ in range(3):
            response = await pool.request(url, b"X-Test: 1\r\n", b"{}", first_byte_timeout=2)
            assert response.status == 200
            assert await response.read() == b"data: a\n\ndata: b\n\n"
            response.release()
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())
    assert connections == 1
    assert requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"X-Test: 1\r\n" in requests[0]
    assert requests[0].endswith(b"Content-Length: 2\r\n\r\n{}")


def test_a_stale_pooled_connection_is_retried_once_on_a_new_one() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # the server closes the idle connection right after answering

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        for _ in range(2):
            response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.05)
        await pool.close()
        server.close()

    run(main())
    assert served == 2


def test_close_delimited_body_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"data: x\n\n"
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_closed_connections_leave_no_reference_cycles() -> None:
    # A connection and its parser referred to each other (the parser holds its callbacks): each
    # closed connection was a cycle of ~16 objects for the collector's full pass.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n")
        await writer.drain()  # then closed by serve(): a close-delimited body

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        with cyclic_garbage() as garbage:
            for _ in range(20):
                response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
                assert await response.read() == b"data: x\n\n"
                response.release()
            await pool.close()
            server.close()
            await server.wait_closed()
        assert garbage.count < 20, f"{garbage.count} objects in cycles after 20 closed connections"

    # On uvloop, chatgate's loop: asyncio's own selector transports are cycles of their own.
    uvloop.run(asyncio.wait_for(main(), 10))


def test_cut_mid_body_is_a_transport_error_after_the_response_began() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        received = b""
        with pytest.raises(TransportError) as caught:
            while (chunk := await response.next_chunk()) is not None:
                received += chunk
        assert received == b"hello"
        assert caught.value.before_response is False
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_timeouts_first_byte_and_idle() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def quiet_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=0.3)
        server, url = await serve(silent)
        with pytest.raises(FirstByteTimeout):
            await pool.request(url, b"", b"{}", first_byte_timeout=0.3)
        server.close()
        server, url = await serve(quiet_after_head)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        with pytest.raises(IdleTimeout):
            await response.read()
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_refused_connection_is_a_connect_error() -> None:
    async def main() -> None:
        server, url = await serve(lambda r, w: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        with pytest.raises(ConnectError):
            await pool.request(url, b"", b"{}", first_byte_timeout=2)
        await pool.close()

    run(main())


def test_unread_body_closes_the_connection_on_release() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await reader.read()  # returns when the client closes
        closed.set()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=5)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        response.release()  # the relay stopped reading: the upstream must see the connection go
        await asyncio.wait_for(closed.wait(), 2)
        await pool.close()
        server.close()

    run(main())


def test_a_reused_connection_carries_no_timer_from_its_last_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=0.2)
        for _ in range(3):
            response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.3)  # longer than the idle timeout, between requests
        await pool.close()
        server.close()

    run(main())


def test_a_get_sends_no_body_and_no_content_length() -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        await writer.drain()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(
            url.replace("chat/completions", "models"), b"", b"", first_byte_timeout=2, method=b"GET"
        )
        assert await response.read() == b"[]"
        response.release()
        await pool.close()
        server.close()

    run(main())
    assert requests[0].startswith(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"content-length" not in requests[0].lower()


def keep_answering(*answers: bytes) -> tuple[Handler, list[int]]:
    """A server that gives each request on a connection the next of `answers`, written as one
    piece; `connections` counts the connections it accepted."""
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        for answer in answers:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)
            await writer.drain()
        await reader.read()

    return handler, connections


@pytest.mark.parametrize("informational", [b"100 Continue", b"102 Processing", b"103 Early Hints"])
def test_1xx_heads_are_skipped_and_the_next_request_gets_its_own_answer(informational: bytes) -> None:
    first = (
        b"HTTP/1.1 " + informational + b"\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfirst"
    )
    handler, connections = keep_answering(first, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert response.status == 200
        assert response.headers == [(b"content-length", b"5"), (b"x-final", b"yes")]
        assert await response.read() == b"first"
        response.release()
        # Another model's request on the same host: its own answer, not what the first left behind.
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"second"
        response.release()
        await pool.close()
        server.close()

    run(main())
    assert len(connections) == 1


def test_101_is_refused_and_the_connection_closed() -> None:
    handler, _ = keep_answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nPRI * HTTP/2.0")

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        with pytest.raises(ProtocolError, match="101"):
            await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert not pool._idle.get(endpoint(url).key)
        await pool.close()
        server.close()

    run(main())


def test_bytes_after_the_answer_are_never_handed_to_the_next_request() -> None:
    # A server out of step: a second response right behind the first, in the same write.
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    handler, connections = keep_answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + stray, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"first"
        response.release()
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"first"  # a new connection's first answer
        response.release()
        await pool.close()
        server.close()

    run(main())
    assert len(connections) == 2


def test_a_pooled_connection_that_hears_anything_while_idle_is_not_reused() -> None:
    # Some servers say "408 Request Timeout" on an idle keep-alive connection before closing it.
    pooled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await pooled.wait()
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        try:
            await read_request(reader)  # a request sent on this connection would get the 408
        except asyncio.IncompleteReadError:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong")
        await writer.drain()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"first"
        response.release()
        pooled.set()
        idle = pool._idle[endpoint(url).key]
        while idle and not idle[0].closed:
            await asyncio.sleep(0.01)  # until the stray 408 has arrived
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert (response.status, await response.read()) == (200, b"first")
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_a_head_over_64_KiB_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for n in range(100_000):  # endless headers, a few KiB at a time
                writer.write(b"X-Filler-%d: %s\r\n" % (n, b"a" * 4000))
                await writer.drain()
        except ConnectionError:
            return

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        with pytest.raises(ProtocolError, match="64 KiB"):
            await pool.request(url, b"", b"{}", first_byte_timeout=5)
        await pool.close()
        server.close()

    run(main())


def test_a_whole_head_over_64_KiB_in_one_write_is_refused() -> None:
    # The head completes within the read that brings it: only counting the header lines as they
    # are parsed sees that it was too large.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        fillers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 8000) for n in range(9))
        writer.write(b"HTTP/1.1 200 OK\r\n" + fillers + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        with pytest.raises(ProtocolError, match="64 KiB"):
            await pool.request(url, b"", b"{}", first_byte_timeout=5)
        await pool.close()
        server.close()

    run(main())


def test_an_endless_body_read_whole_stops_at_the_limit() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            closed.set()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2, max_body_bytes=1024 * 1024)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        with pytest.raises(BodyTooLarge):
            await response.read()
        response.release()
        await asyncio.wait_for(closed.wait(), 5)  # the upstream sees the connection go
        await pool.close()
        server.close()

    run(main())


def test_read_with_truncate_returns_exactly_the_limit() -> None:
    handler, _ = keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read(4, truncate=True) == b"0123"
        response.release()
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        with pytest.raises(BodyTooLarge):
            await response.read(9)
        response.release()
        await pool.close()
        server.close()

    run(main())


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (ECONNRESET on the other side), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_a_reset_never_ends_a_close_delimited_body_cleanly() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.next_chunk() == b"data: x\n\n"
        with pytest.raises(TransportError, match="reset") as caught:
            await response.next_chunk()
        assert caught.value.before_response is False
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_a_whole_answer_deadline_covers_the_body() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        try:
            for _ in range(1000):  # a byte every 50 ms: never idle, never done
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            return

    async def main() -> None:
        server, url = await serve(trickle)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await pool.request(url, b"", b"{}", first_byte_timeout=0.5, whole_answer=True)
        with pytest.raises(AnswerTimeout):
            await response.read()
        assert loop.time() - started < 1.5
        response.release()
        # Without whole_answer the same timeout bounds only the head.
        response = await pool.request(url, b"", b"{}", first_byte_timeout=0.5)
        assert await asyncio.wait_for(response.next_chunk(), 1) == b"x"
        await asyncio.sleep(0.6)
        assert await response.next_chunk()
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_idle_connections_expire() -> None:
    handler, connections = keep_answering(*[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 4)
    told, told_connections = keep_answering(
        *[b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0, max=100\r\nContent-Length: 2\r\n\r\nok"] * 4
    )

    async def twice(url: str, pool: Pool, pause: float) -> None:
        for _ in range(2):
            response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(pause)

    async def main() -> None:
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2, keepalive_expiry=0.2)
        server, url = await serve(handler)
        await twice(url, pool, 0.3)  # longer than the expiry: a new connection
        await twice(url, pool, 0)  # reused
        server.close()
        # The server's own Keep-Alive timeout, when smaller, wins.
        server, url = await serve(told)
        await twice(url, pool, 0)
        await pool.close()
        server.close()

    run(main())
    assert len(connections) == 3
    assert len(told_connections) == 2


def test_a_silent_reused_connection_is_retried_on_a_new_one() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served > 1:  # the fresh connection answers at once
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await writer.drain()
            return
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await reader.read()  # then silence: like a keep-alive socket that died without a FIN

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"first"
        response.release()
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await pool.request(url, b"", b"{}", first_byte_timeout=1)
        assert await response.read() == b"fresh"
        assert loop.time() - started < 1  # within the one budget
        response.release()
        await pool.close()
        server.close()

    run(main())
    assert served == 2


def test_a_silent_reused_connection_is_not_asked_twice_for_a_whole_answer() -> None:
    # A non-streamed answer's head comes only when the answer is ready: silence is expected, and
    # re-sending would have the model generate it twice.
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await read_request(reader)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await read_request(reader)
        requests += 1
        await asyncio.sleep(0.6)  # computing the answer: longer than half the budget
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"first"
        response.release()
        response = await pool.request(url, b"", b"{}", first_byte_timeout=1, whole_answer=True)
        assert await response.read() == b"slow"
        response.release()
        await pool.close()
        server.close()

    run(main())
    assert requests == 2


def test_a_connect_that_times_out_tries_the_next_address() -> None:
    async def main() -> None:
        server, url = await serve(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")[0])
        port = endpoint(url).port
        # 127.0.0.2:port listens with a full accept queue: a connect to it hangs (SYN dropped).
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.2", port))
        blackhole.listen(0)
        fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.2", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        try:
            pool = Pool(await loopback(["127.0.0.2", "127.0.0.1"]), connect_timeout=1, idle_timeout=2)
            response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await pool.close()
        finally:
            for sock in (blackhole, *fillers):
                sock.close()
            server.close()

    run(main())


def test_a_refused_connect_tries_the_next_address() -> None:
    async def main() -> None:
        server, url = await serve(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")[0])
        pool = Pool(await loopback(["127.0.0.2", "127.0.0.1"]), connect_timeout=1, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.read() == b"ok"
        response.release()
        await pool.close()
        server.close()

    run(main())


def test_a_pump_takes_reads_in_order_and_the_reader_gets_the_rest() -> None:
    """Reads the sink takes never wake the reader; those it declines, and the end, reach the
    reader in the order they came, and nothing is taken while an older read waits unread."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"first", b"take 1", b"take 2", b"skip 3", b"take 4"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)  # one read each
        await release.wait()
        writer.write(b"6\r\ntake 5\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        taken: list[bytes] = []
        read: list[bytes] = []

        def sink(chunk: bytes) -> bool:
            if chunk.startswith(b"take"):
                taken.append(chunk)
                return True
            return False

        read.append(await response.next_chunk() or b"")
        response.pump(sink)
        read.append(await response.next_chunk() or b"")  # woken by "skip 3" only
        assert taken == [b"take 1", b"take 2"]
        await asyncio.sleep(0.1)  # "take 4" arrives while nobody waits: queued, not taken
        release.set()
        read.append(await response.next_chunk() or b"")
        read.append(await response.next_chunk() or b"")  # came with the end: the reader's
        assert await response.next_chunk() is None
        response.release()
        await pool.close()
        server.close()
        await server.wait_closed()
        assert read == [b"first", b"skip 3", b"take 4", b"take 5"]
        assert taken == [b"take 1", b"take 2"]

    run(main())


def test_what_a_pump_raises_is_raised_to_the_reader_and_the_connection_closed() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"3\r\ntwo\r\n")
        await writer.drain()
        await reader.read()  # EOF: chatgate closed the connection
        closed.set()

    class Broken(Exception):
        pass

    def sink(chunk: bytes) -> bool:
        raise Broken(chunk.decode())

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        response = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await response.next_chunk() == b"one"
        response.pump(sink)
        with pytest.raises(Broken, match="two"):
            await response.next_chunk()
        response.release()
        await asyncio.wait_for(closed.wait(), 2)
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_a_released_answer_stops_its_pump_before_the_connection_is_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"3\r\none\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"3\r\ntwo\r\n0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        server, url = await serve(handler)
        pool = Pool(await loopback(), connect_timeout=2, idle_timeout=2)
        offered: list[bytes] = []

        def sink(chunk: bytes) -> bool:
            offered.append(chunk)
            return False

        first = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        first.pump(sink)
        assert await first.read() == b"onetwo"
        first.release()
        offered.clear()
        second = await pool.request(url, b"", b"{}", first_byte_timeout=2)
        assert await second.read() == b"onetwo"
        second.release()
        assert offered == []  # the first answer's pump went with it
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())
