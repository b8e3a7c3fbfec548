"""An incremental Server-Sent Events decoder for the relay's hot path.

Hand-written because it runs once per upstream read on every streamed chat: it works on bytes,
keeps only the unfinished tail between reads, and handles what real servers send: LF, CR and
CRLF line ends (a CRLF may be split across two reads), comment lines such as `: ping`,
multi-line `data:` fields, and events without a trailing blank line at end of stream.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DONE = b"[DONE]"


class Event(NamedTuple):
    """One dispatched event: its `event:` name (empty for the default) and its data."""

    event: bytes
    data: bytes


class SSEDecoder:
    """Feed it network chunks; it returns the events each chunk completed."""

    __slots__ = ("_data", "_event", "_skip_lf", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._skip_lf = False
        self._data: list[bytes] = []
        self._event = b""

    @property
    def at_boundary(self) -> bool:
        """Whether the next chunk starts a new event (nothing unfinished is held)."""
        return not (self._tail or self._skip_lf or self._data or self._event)

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode one chunk and return the events it completed, in order."""
        return [Event(b"", item) if type(item) is bytes else item for item in self._feed(chunk)]  # type: ignore[misc]

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """Like `feed`, but only each event's data: for a relay that ignores event names."""
        return [item if type(item) is bytes else item.data for item in self._feed(chunk)]  # type: ignore[union-attr]

    def _feed(self, chunk: bytes) -> list[bytes | Event]:
        if self._skip_lf:
            # The previous chunk ended in CR: a leading LF is the second half of that CRLF.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        if not chunk:
            return []
        if b"\r" not in chunk and not self._data and not self._event:
            return self._feed_lf(chunk)
        return list(self._feed_lines(chunk))

    def _feed_lf(self, chunk: bytes) -> list[bytes | Event]:
        # The common case, LF framing from a clean event boundary: cut whole events at blank
        # lines, and take a lone `data: ` line without going line by line (most of a relay's
        # parsing time was the general path below). Such an event is returned as its bare data.
        blocks = chunk.split(b"\n\n")
        self._tail = blocks.pop()
        items: list[bytes | Event] = []
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:
                items.append(block[6:])
            elif block:
                events: list[Event] = []
                for line in block.split(b"\n"):
                    self._line(line, events)
                self._line(b"", events)
                items.extend(events)
        if self._tail[:1] == b"\n":
            # Three or more line ends in a row: the extra ones are blank lines, nothing more.
            self._tail = self._tail.lstrip(b"\n")
        return items

    def _feed_lines(self, chunk: bytes) -> list[Event]:
        lines = chunk.splitlines(keepends=True)
        last = lines[-1]
        if last[-1:] not in (b"\n", b"\r"):
            self._tail = lines.pop()
        elif last[-1:] == b"\r":
            self._skip_lf = True
        events: list[Event] = []
        for raw in lines:
            self._line(raw.rstrip(b"\r\n"), events)
        return events

    def flush(self) -> list[Event]:
        """End of stream: dispatch what a well-behaved server would have ended with a blank line."""
        events: list[Event] = []
        if self._tail:
            # The LF fast path may hold several complete lines of an unfinished event.
            for line in self._tail.splitlines():
                self._line(line, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append(Event(self._event, b"\n".join(self._data)))
                self._data = []
            self._event = b""
            return
        if line[:1] == b":":
            return  # a comment: keep-alive pings and the like
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value
        # `id` and `retry` mean nothing to a relay that does not reconnect.


_DATA = b"data: "
_BETWEEN = b"\n\n" + _DATA
_DONE_EVENT = _DATA + DONE + b"\n\n"


def data_array(chunk: bytes) -> tuple[bytes, int, bool] | None:
    """For a read of whole one-line `data: {…}` events with LF framing, what servers write nearly
    always: their data as one JSON array text, the number of events in it, and whether the read
    ended with [DONE]. None for any other read, which the decoder must take.

    No event is cut out one by one: the separators become commas in one pass. A JSON string
    cannot hold a raw line end, so `\\n\\ndata: ` occurs only between events. Anything else in the
    read (a comment, an `event:` line, a multi-line data, [DONE] before the end) leaves text that
    is not JSON, and the caller goes back to the decoder when the array does not parse or its
    length is not the number of events."""
    finished = chunk.endswith(_DONE_EVENT)
    if finished:
        chunk = chunk[: -len(_DONE_EVENT)]
        if not chunk:
            return b"[]", 0, True
    if not (chunk.startswith(_DATA + b"{") and chunk.endswith(b"}\n\n")) or b"\r" in chunk:
        return None
    events = chunk.count(_BETWEEN) + 1
    return b"[" + chunk[len(_DATA) : -2].replace(_BETWEEN, b",") + b"]", events, finished


# A blank line ends an event: two line ends in a row, each CR, LF or CRLF (a CR followed by LF
# is one CRLF, never two line ends).
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


def split_events(data: bytes) -> list[bytes]:
    """Cut whole events apart as raw bytes, each with the blank line that ends it."""
    events: list[bytes] = []
    start = 0
    for match in _BLANK_LINE.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        events.append(data[start:])
    return events


def decode_event(raw: bytes) -> list[Event]:
    """The events in raw bytes that `split_events` cut out (or a stream's unterminated end)."""
    decoder = SSEDecoder()
    return decoder.feed(raw) + decoder.flush()


class EventFramer:
    """Cuts a byte stream at event boundaries without decoding it, for a relay that passes the
    upstream's bytes through as they are.

    `feed` returns the complete events of a read and keeps an unfinished one for the next: no SSE
    client can dispatch half an event, so holding it back costs no latency, and the relay gets
    whole events to look into. A stream that never ends an event is passed through once the held
    part exceeds `max_held` bytes."""

    __slots__ = ("_held", "_max_held")

    def __init__(self, max_held: int = 1 << 20) -> None:
        self._held = b""
        self._max_held = max_held

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if chunk.endswith(_EVENT_ENDS):  # what real servers write: whole events per read
            return chunk
        end = 0
        for match in _BLANK_LINE.finditer(chunk):
            end = match.end()
        if len(chunk) - end > self._max_held:
            return chunk
        self._held = chunk[end:]
        return chunk[:end]

    def flush(self) -> bytes:
        """End of stream: whatever was held (an event without its closing blank line)."""
        held, self._held = self._held, b""
        return held
