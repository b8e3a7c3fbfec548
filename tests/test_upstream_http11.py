"""The hand-written upstream HTTP/1.1 client, against real sockets on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from chatgate.upstream.http11 import (
    ConnectError,
    FirstByteTimeout,
    IdleTimeout,
    Pool,
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
            assert b"".join([c async for c in response]) == b"data: a\n\ndata: b\n\n"
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
            async for chunk in response:
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
            async for _chunk in response:
                pass
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
