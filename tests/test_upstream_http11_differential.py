"""The upstream client's response parser against h11, the reference: generated responses, cut at
random read boundaries, must give the same status, headers and body, or be refused by both.

http11's side is the `_Connection` protocol object driven directly (`data_received`, then
`connection_lost` as the server closes), the way uvicorn tests its protocols: over a real socket
the kernel would merge and split the writes as it likes, so the read boundaries hypothesis chose
would never reach the parser, and each example would cost milliseconds instead of microseconds.
Whole-request behaviour over real sockets is in test_upstream_http11.py.
"""

from __future__ import annotations

import asyncio

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.mock_transport import MockTransport

from chatgate.upstream.http11 import MAX_HEAD, ProtocolError, TransportError, _Connection

Outcome = tuple[int, list[tuple[bytes, bytes]], bytes] | None  # None: refused

_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(str.encode)
_VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789 \t;=,/.:-_()", max_size=40).map(str.encode)
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade"}
_HEADERS = st.lists(st.tuples(_TOKEN, _VALUE).filter(lambda h: h[0] not in _FRAMING), max_size=6)
_BODY = st.binary(max_size=300)


def head(status: bytes, headers: list[tuple[bytes, bytes]], version: bytes = b"HTTP/1.1") -> bytes:
    return version + b" " + status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    out = b""
    rest = body
    while rest:
        size = draw(st.integers(1, len(rest)))
        extension = draw(st.sampled_from([b"", b";a=b", b';name="q r"', b";a=b;c"]))
        out += b"%x%s\r\n%s\r\n" % (size, extension, rest[:size])
        rest = rest[size:]
    trailers = draw(st.sampled_from([b"", b"X-Trailer: t\r\n", b"X-A: 1\r\nX-B: 2\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n"


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int]:
    """Raw response bytes and the largest read to cut them into."""
    wire = b""
    for code in draw(st.lists(st.sampled_from([b"100 Continue", b"102 Processing", b"103 Early Hints"]), max_size=2)):
        wire += head(code, draw(_HEADERS))
    status = draw(
        st.sampled_from([b"200 OK", b"201 Created", b"204 No Content", b"404 Not Found", b"500 ", b"429 Slow"])
    )
    headers = draw(_HEADERS)
    body = draw(_BODY)
    framing = draw(st.sampled_from(["length", "chunked", "close", "broken", "101", "bad-status", "oversize"]))
    max_read = draw(st.integers(1, 512))
    if framing == "length":
        wire += head(status, [*headers, (b"content-length", b"%d" % len(body))])
        if not status.startswith(b"204"):
            wire += body
    elif framing == "chunked":
        wire += head(status, [(b"transfer-encoding", b"chunked"), *headers])
        if not status.startswith(b"204"):
            wire += draw(chunked_body(body))
    elif framing == "close":
        wire += head(status, headers) + (b"" if status.startswith(b"204") else body)
    elif framing == "broken":
        wire += draw(
            st.sampled_from(
                [
                    head(status, [(b"content-length", b"%d" % (len(body) + 5))]) + body,  # cut short
                    head(status, [(b"content-length", b"1x")]) + body,
                    head(status, [(b"content-length", b"2"), (b"content-length", b"3")]) + body,
                    head(status, [(b"transfer-encoding", b"chunked")]) + b"zz\r\n" + body,
                    head(status, [(b"transfer-encoding", b"chunked")]) + b"3\r\nabcd\r\n0\r\n\r\n",
                    head(status, [(b"transfer-encoding", b"chunked")]) + b"3\r\nabc\r\n",  # no last chunk
                    head(status, [(b"transfer-encoding", b"gzip")]) + body,
                    head(status, [(b"transfer-encoding", b"gzip, chunked")]) + b"0\r\n\r\n",
                    b"HTTP/1.1 2000 OK\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
                    b"SMTP ready\r\n",
                    wire[:-2] if wire else b"HTTP/1.1 200",  # a head without its end
                ]
            )
        )
    elif framing == "101":
        wire += head(b"101 Switching Protocols", [(b"upgrade", b"h2c"), (b"connection", b"upgrade")]) + body
    elif framing == "bad-status":
        wire += head(b"099 Early", headers) + body
    else:  # a head far over the bound, in reads small enough that both see it grow
        wire += b"HTTP/1.1 200 OK\r\n" + b"".join(
            b"X-Fill-%d: %s\r\n" % (i, b"f" * 1000) for i in range(3 * MAX_HEAD // 1000)
        )
        wire += b"Content-Length: 0\r\n\r\n"
        max_read = draw(st.integers(1000, 16 * 1024))
    return wire, max_read


@st.composite
def cut(draw: st.DrawFn) -> list[bytes]:
    wire, max_read = draw(responses())
    pieces = []
    at = 0
    while at < len(wire):
        size = draw(st.integers(1, max_read)) if max_read < 1000 else max_read
        pieces.append(wire[at : at + size])
        at += size
    return pieces


def by_h11(pieces: list[bytes]) -> Outcome:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(
        h11.Request(method="POST", target="/v1/chat/completions", headers=[("Host", "x"), ("Content-Length", "0")])
    )
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, [], b""
    try:
        for piece in [*pieces, b""]:  # b"": the server closes after its answer
            conn.receive_data(piece)
            while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, headers, body
                elif isinstance(event, h11.ConnectionClosed):
                    return None
    except h11.RemoteProtocolError:
        return None
    return None


def by_http11(pieces: list[bytes]) -> Outcome:
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, 60.0, ("http", "x", 80))
        transport = MockTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.send(b"POST / HTTP/1.1\r\n\r\n", loop.time() + 3600, None)
        for piece in pieces:
            if transport.closed:
                break  # the client gave up on the connection: it reads no further
            conn.data_received(piece)
        conn.connection_lost(None)
        # After the end of the connection, the head must be settled one way or the other: a
        # future left pending would hang a request until its timeout.
        assert conn.head.done(), "the connection neither answered nor failed"

        async def outcome() -> Outcome:
            try:
                await conn.head
                parts = []
                while (chunk := await conn.read()) is not None:
                    parts.append(chunk)
            except (ProtocolError, TransportError):
                return None
            return conn.status, conn.headers, b"".join(parts)

        return loop.run_until_complete(outcome())
    finally:
        conn.close()
        loop.close()


@settings(max_examples=300, deadline=None)
@given(cut())
def test_http11_reads_what_h11_reads(pieces: list[bytes]) -> None:
    assert by_http11(pieces) == by_h11(pieces)


def test_content_length_with_chunked_is_refused_where_h11_lets_chunked_win() -> None:
    # A known difference, left on the safe side: RFC 9112 §6.1 lets a client treat the pair as an
    # error, and a response framed two ways is how request/response smuggling starts.
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"]
    assert by_h11(pieces) == (200, [(b"content-length", b"2"), (b"transfer-encoding", b"chunked")], b"ok")
    assert by_http11(pieces) is None


def test_whitespace_in_a_chunk_extension_is_refused_where_h11_allows_it() -> None:
    # A known difference, llhttp's strictness: RFC 9112 allows "bad whitespace" around ";" and "=";
    # no model server sends chunk extensions at all, so refusing them costs nothing real.
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2; a=b\r\nok\r\n0\r\n\r\n"]
    assert by_h11(pieces) == (200, [(b"transfer-encoding", b"chunked")], b"ok")
    assert by_http11(pieces) is None


def test_obs_fold_and_bare_lf_are_refused_where_h11_allows_them() -> None:
    # Known differences, llhttp's strictness: both are obsolete forms no model server sends, and a
    # parser that reads line endings loosely is another way into smuggling.
    folded = [b"HTTP/1.1 200 OK\r\nX-A: v\r\n  folded\r\nContent-Length: 0\r\n\r\n"]
    bare_lf = [b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"]
    assert by_h11(folded) == (200, [(b"x-a", b"v folded"), (b"content-length", b"0")], b"")
    assert by_h11(bare_lf) == (200, [(b"content-length", b"2")], b"ok")
    assert by_http11(folded) is None
    assert by_http11(bare_lf) is None
