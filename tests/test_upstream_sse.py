"""The incremental SSE decoder (upstream/sse.py): framing as real servers send it."""

from __future__ import annotations

import pytest

from chatgate.upstream.sse import DONE, Event, SSEDecoder


def feed_all(*chunks: bytes) -> list[Event]:
    decoder = SSEDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def test_data_events_and_done() -> None:
    assert feed_all(b'data: {"a":1}\n\ndata: [DONE]\n\n') == [Event(b"", b'{"a":1}'), Event(b"", DONE)]


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(newline: bytes) -> None:
    stream = b"data: one" + newline + newline + b"data: two" + newline + newline
    assert [e.data for e in feed_all(stream)] == [b"one", b"two"]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    assert [e.data for e in feed_all(b"data: one\r", b"\n\r", b"\ndata: two\r\n\r\n")] == [b"one", b"two"]


def test_bytes_fed_one_at_a_time() -> None:
    stream = b": ping\r\n\r\nevent: message\r\ndata: x\r\n\r\ndata: [DONE]\r\n\r\n"
    assert feed_all(*(stream[i : i + 1] for i in range(len(stream)))) == [Event(b"message", b"x"), Event(b"", DONE)]


def test_comments_are_skipped() -> None:
    assert feed_all(b": ping\n\n:another\ndata: x\n\n") == [Event(b"", b"x")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert feed_all(b"data: first\ndata: second\ndata:third\n\n") == [Event(b"", b"first\nsecond\nthird")]


def test_event_name_and_ignored_fields() -> None:
    assert feed_all(b"event: error\nid: 7\nretry: 10\ndata: {}\n\n") == [Event(b"error", b"{}")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert feed_all(b"\n\n\r\n") == []


def test_a_last_event_without_its_blank_line_is_dispatched_at_end_of_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: tail") == []
    assert decoder.flush() == [Event(b"", b"tail")]


def test_utf8_split_inside_a_character_survives() -> None:
    data = "data: héllo ✓\n\n".encode()
    cut = data.index("✓".encode()) + 1
    assert feed_all(data[:cut], data[cut:]) == [Event(b"", "héllo ✓".encode())]


def test_an_unfinished_multi_line_event_is_complete_at_end_of_stream() -> None:
    assert feed_all(b"data: a\ndata: b") == [Event(b"", b"a\nb")]
    assert feed_all(b"data: x\n\ndata: a\n", b"data: b\n") == [Event(b"", b"x"), Event(b"", b"a\nb")]


def test_extra_blank_lines_between_events() -> None:
    assert feed_all(b"data: a\n\n\n\ndata: b\n\n\n") == [Event(b"", b"a"), Event(b"", b"b")]
