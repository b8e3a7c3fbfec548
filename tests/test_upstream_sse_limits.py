"""One SSE event is bounded, and decoding is linear in the bytes read (upstream/sse.py).

A model server is anyone's base URL: an answer that never ends an event must fail the stream at
the bound, and reading it up to there must not cost more per read as the held part grows (the
unread tail was re-joined on every read: 200 MB without a boundary took 64 s of CPU)."""

from __future__ import annotations

import time

import pytest

from chatgate.errors import UpstreamProtocolError
from chatgate.upstream.sse import DEFAULT_MAX_EVENT_BYTES, EventFramer, SSEDecoder, ends_finished

READ = 4096
TOTAL = 20 * 1024 * 1024
# Linear work on 20 MB is tens of milliseconds; the quadratic decoder took minutes. The bound
# is generous for a loaded machine, and still far below what re-joining would cost.
GENEROUS = 3.0


def reads(pattern: bytes, total: int = TOTAL) -> list[bytes]:
    piece = (pattern * (READ // len(pattern) + 1))[:READ]
    return [piece] * (total // READ)


@pytest.mark.parametrize(
    "pattern",
    [b"x", b"data: xxxxxxx\n", b"data: y\r\n"],
    ids=["one endless line", "many data lines, no blank line", "CRLF data lines"],
)
def test_decoding_20_mb_without_a_boundary_is_linear(pattern: bytes) -> None:
    decoder = SSEDecoder(max_event_bytes=TOTAL * 2)
    decoder.feed(b"data: ")
    started = time.process_time()
    for chunk in reads(pattern):
        assert decoder.feed(chunk) == []
    events = decoder.feed(b"\n\n")
    elapsed = time.process_time() - started
    assert len(events) == 1
    assert len(events[0].data) > TOTAL // 5  # the event came out whole (its data without field names)
    assert elapsed < GENEROUS, f"{elapsed:.2f} s of CPU for 20 MB"


def test_framing_20_mb_without_a_boundary_is_linear() -> None:
    framer = EventFramer(max_event_bytes=TOTAL * 2)
    started = time.process_time()
    for chunk in reads(b"data: xxxxxxx\n"):
        assert framer.feed(chunk) == b""
    data = framer.feed(b"\n\n")
    elapsed = time.process_time() - started
    assert len(data) == TOTAL + 2
    assert elapsed < GENEROUS, f"{elapsed:.2f} s of CPU for 20 MB"


@pytest.mark.parametrize("pattern", [b"x", b"data: x\n", b"data: x\r"], ids=["line", "LF lines", "CR lines"])
def test_an_event_larger_than_the_bound_fails(pattern: bytes) -> None:
    decoder = SSEDecoder(max_event_bytes=64 * 1024)
    with pytest.raises(UpstreamProtocolError, match="more than 65536 bytes without ending an event"):
        for chunk in reads(pattern, total=1024 * 1024):
            decoder.feed(chunk)


def test_the_default_bound_stops_an_endless_event_at_a_few_mib() -> None:
    decoder, framer = SSEDecoder(), EventFramer()
    fed = 0
    with pytest.raises(UpstreamProtocolError):
        for chunk in reads(b"data: x\n", total=64 * 1024 * 1024):
            framer.feed(chunk)
            decoder.feed(chunk)
            fed += len(chunk)
    assert DEFAULT_MAX_EVENT_BYTES <= fed <= DEFAULT_MAX_EVENT_BYTES + READ


def test_events_under_the_bound_pass_in_any_split() -> None:
    event = b"data: " + b"z" * 1000 + b"\n\n"
    decoder = SSEDecoder(max_event_bytes=len(event))
    framer = EventFramer(max_event_bytes=len(event))
    got, framed = [], b""
    for start in range(0, len(event) * 3, 7):
        chunk = (event * 3)[start : start + 7]
        got += decoder.feed_data(chunk)
        framed += framer.feed(chunk)
    assert got == [b"z" * 1000] * 3
    assert framed == event * 3


@pytest.mark.parametrize(
    ("tail", "finished"),
    [
        (b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n', True),
        (b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n', True),
        (b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n', False),
        # The usage chunk after the finish: the last event naming a finish_reason decides.
        (b'data: {"choices":[{"finish_reason":"stop"}]}\n\ndata: {"choices":[],"usage":{}}\n\n', True),
        (b'data: {"choices":[{"finish_reason":"stop"}]}\n\ndata: {"choices":[{"finish_reason":null}]}\n\n', False),
        # n > 1: any choice of the last such event counts.
        (b'data: {"choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":null}]}\n\n', True),
        # A content string that spells the key is not the key.
        (b'data: {"choices":[{"delta":{"content":"\\"finish_reason\\":\\"stop\\""},"finish_reason":null}]}', False),
        (b"", False),
    ],
)
def test_ends_finished(tail: bytes, finished: bool) -> None:
    assert ends_finished(tail) is finished
