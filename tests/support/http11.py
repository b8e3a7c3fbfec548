"""Just enough HTTP/1.1 for the fake upstream: read requests off a byte stream, frame responses.

Hand-written because the fake must decide every byte and every write on the wire (split chunks,
bare CR framing, a status line that never comes), which a real server library hides on purpose.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

MAX_HEAD_BYTES = 64 * 1024
LAST_CHUNK = b"0\r\n\r\n"


class BadRequest(Exception):
    """The peer sent something that is not an HTTP/1.1 request this module understands."""


class Incoming:
    """The bytes received on one connection so far, awaited by the request reader."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._changed = asyncio.Event()
        self.eof = False

    def feed(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._changed.set()

    def feed_eof(self) -> None:
        self.eof = True
        self._changed.set()

    async def read_until(self, separator: bytes, limit: int = MAX_HEAD_BYTES) -> bytes | None:
        """Bytes up to and including `separator`; None if the peer closed first."""
        while True:
            index = self._buffer.find(separator)
            if index >= 0:
                end = index + len(separator)
                data = bytes(self._buffer[:end])
                del self._buffer[:end]
                return data
            if len(self._buffer) > limit:
                raise BadRequest("request head too large")
            if self.eof:
                return None
            await self._wait()

    async def read_exactly(self, size: int) -> bytes | None:
        """Exactly `size` bytes; None if the peer closed first."""
        while len(self._buffer) < size:
            if self.eof:
                return None
            await self._wait()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()


@dataclass(frozen=True)
class Request:
    """One parsed request; header names are kept as sent, looked up case-insensitively."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return unquote(self.target.partition("?")[0])

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        values = [value for key, value in self.headers if key.lower() == lowered]
        return ", ".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


async def read_request(incoming: Incoming) -> Request | None:
    """The next request on the connection, or None when the peer closed between requests."""
    head = await incoming.read_until(b"\r\n\r\n")
    if head is None:
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise BadRequest(f"bad request line {lines[0]!r}") from exc
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    request = Request(method, target, version, headers, b"")
    body = await _read_body(incoming, request)
    if body is None:
        return None
    return Request(method, target, version, headers, body)


async def _read_body(incoming: Incoming, request: Request) -> bytes | None:
    if "chunked" in (request.header("transfer-encoding") or "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await incoming.read_until(b"\r\n")
            if size_line is None:
                return None
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            data = await incoming.read_exactly(size + 2)  # the chunk and its CRLF
            if data is None:
                return None
            if size == 0:
                return b"".join(parts)  # trailers are not supported; none of our clients send them
            parts.append(data[:-2])
    length = int(request.header("content-length") or "0")
    return await incoming.read_exactly(length)


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """The status line and headers, ending with the blank line."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data would end the body, so callers skip it."""
    return b"%x\r\n%s\r\n" % (len(data), data)
