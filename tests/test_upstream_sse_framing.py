"""Event framing for the passthrough relay (upstream/sse.py: EventFramer, split_events)."""

from __future__ import annotations

import pytest

from chatgate.errors import UpstreamProtocolError
from chatgate.upstream.sse import Event, EventFramer, decode_event, split_events

STREAM = b'data: {"a":1}\n\n: ping\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'


def reframe(chunks: list[bytes]) -> list[bytes]:
    framer = EventFramer()
    out = [framer.feed(chunk) for chunk in chunks]
    return [*out, framer.flush()]


def test_whole_events_pass_at_once() -> None:
    assert reframe([STREAM]) == [STREAM, b""]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_any_split_gives_back_the_same_bytes_cut_at_event_ends(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    out = reframe(chunks)
    assert b"".join(out) == STREAM
    for piece in out:
        assert piece == b"" or piece.endswith(b"\n\n")


@pytest.mark.parametrize("newline", [b"\r", b"\r\n"])
def test_cr_and_crlf_event_ends(newline: bytes) -> None:
    stream = b"data: a" + newline * 2 + b"data: b" + newline + b"data: c" + newline * 2
    out = reframe([stream[:-1], stream[-1:]])
    assert b"".join(out) == stream
    assert [e.data for piece in out for raw in split_events(piece) for e in decode_event(raw)] == [b"a", b"b\nc"]


def test_crlf_is_one_line_end_not_a_blank_line() -> None:
    assert split_events(b"data: a\r\ndata: b\r\n\r\n") == [b"data: a\r\ndata: b\r\n\r\n"]


def test_split_events_keeps_each_events_bytes() -> None:
    assert split_events(STREAM) == [b'data: {"a":1}\n\n', b": ping\n\n", b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    assert split_events(b"data: x\n\ndata: y") == [b"data: x\n\n", b"data: y"]


def test_decode_event() -> None:
    assert decode_event(b"event: e\ndata: 1\ndata: 2\n\n") == [Event(b"e", b"1\n2")]
    assert decode_event(b": comment\n\n") == []


def test_a_stream_that_never_ends_an_event_fails_past_the_limit() -> None:
    # An answer that is not SSE is not relayed as SSE: past the bound it is an error, not passed on.
    framer = EventFramer(max_event_bytes=12)
    assert framer.feed(b"data: 12345") == b""
    with pytest.raises(UpstreamProtocolError, match="more than 12 bytes without ending an event"):
        framer.feed(b"6789")


@pytest.mark.parametrize("ends", [(b"\n", b"\n"), (b"\r\n", b"\r\n"), (b"\r", b"\r")])
def test_a_blank_line_split_across_reads_ends_the_held_event(ends: tuple[bytes, bytes]) -> None:
    first, second = ends
    framer = EventFramer()
    assert framer.feed(b"data: a" + first) == b""
    assert framer.feed(second + b"data: b") == b"data: a" + first + second
    assert framer.flush() == b"data: b"
