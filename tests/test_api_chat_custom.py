"""api/chat_custom.py's reading of upstream reads: the fast paths (`data_array`, `one_event_data`)
must give exactly what the SSE decoder path gives (texts, end, token counts and errors) for any
stream cut into reads anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatgate.api.chat_custom import _read_texts, _texts
from chatgate.errors import ChatgateError
from chatgate.trace import ChatTrace
from chatgate.upstream.sse import SSEDecoder, data_array, one_event_data

_content = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def chunk_object(content: object, *, role: bool = False, choices: int = 1) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": i, "delta": delta, "finish_reason": None} for i in range(choices)],
    }


@st.composite
def event_data(draw: st.DrawFn) -> bytes:
    """The data of one event: mostly ordinary chunks, and everything else a server may send."""
    kind = draw(
        st.sampled_from(
            ["text", "text", "text", "role", "null", "usage", "usage-null", "error", "two", "other", "bad", "nonobj"]
        )
    )
    text = draw(_content)
    obj: object
    if kind == "text":
        obj = chunk_object(text)
    elif kind == "role":
        obj = chunk_object(text, role=True)
    elif kind == "null":
        obj = chunk_object(None)
    elif kind == "usage":
        obj = {**chunk_object(text), "usage": {"prompt_tokens": 3, "completion_tokens": len(text)}}
    elif kind == "usage-null":
        obj = {**chunk_object(text), "usage": None}
    elif kind == "error":
        obj = {"error": {"message": f"failed: {text}"}}
    elif kind == "two":
        obj = chunk_object(text, choices=2)
    elif kind == "other":
        obj = {"choices": [{"delta": {"reasoning_content": text, "content": "x"}, "logprobs": {"content": []}}]}
    elif kind == "nonobj":
        obj = [text]
    else:
        # Not JSON; or JSON only if a bare CR, which ends an SSE line, were taken for whitespace.
        return draw(
            st.sampled_from(
                [b"not json", b"{", b'{"choices": [', b"}", b"[DONE", b'{"a": 1} x', b'{"choices":\r[{"delta":{}}]}']
            )
        )
    spaced = draw(st.booleans())
    # Now and then pretty-printed: valid JSON, but its line ends make SSE lines of their own.
    indent = draw(st.sampled_from([None] * 9 + [1]))
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), separators=separators, indent=indent).encode()


@st.composite
def upstream_reads(draw: st.DrawFn) -> list[bytes]:
    """A stream of events (with now and then a comment, an `event:` line, a multi-line data or
    CRLF framing), ending with [DONE] or not, cut into reads at arbitrary places."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        data = draw(event_data())
        end = draw(st.sampled_from([b"\n\n"] * 6 + [b"\r\n\r\n", b"\n\n\n"]))
        extra = draw(st.sampled_from([b""] * 8 + [b": ping\n\n", b"event: message\n", b"data: more\n"]))
        parts.append(extra + b"data: " + data + end)
    if draw(st.booleans()):
        parts.append(b"data: [DONE]\n\n")
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    if draw(st.booleans()):  # most servers write whole events per read
        cuts = [i for i in range(len(stream) + 1) if stream[:i].endswith(b"\n\n")][: draw(st.integers(0, 3))]
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def relay(reads: list[bytes], read: Any) -> tuple[list[tuple[list[str], bool]], object, tuple[Any, Any]]:
    """What a relay reading `reads` with `read` gets per read, until [DONE] or an error."""
    decoder, trace = SSEDecoder(), ChatTrace()
    seen: list[tuple[list[str], bool]] = []
    failure: object = None
    try:
        for chunk in reads:
            texts, finished = read(chunk, decoder, trace)
            seen.append((texts, finished))
            if finished:
                break
    except ChatgateError as exc:
        failure = (type(exc), exc.message)
    return seen, failure, (trace.prompt_tokens, trace.completion_tokens)


def through_decoder(chunk: bytes, decoder: SSEDecoder, trace: ChatTrace) -> tuple[list[str], bool]:
    return _texts(decoder.feed_data(chunk), trace)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upstream_reads())
def test_the_fast_path_reads_what_the_decoder_reads(reads: list[bytes]) -> None:
    assert relay(reads, _read_texts) == relay(reads, through_decoder)


def test_an_ordinary_read_takes_the_fast_path() -> None:
    events = [b"data: " + json.dumps(chunk_object(t)).encode() + b"\n\n" for t in ("Hel", 'lo "', "\u00e9")]
    whole = data_array(b"".join(events) + b"data: [DONE]\n\n")
    assert whole is not None
    assert whole[1:] == (3, True)
    assert _read_texts(b"".join(events), SSEDecoder(), ChatTrace()) == (["Hel", 'lo "', "\u00e9"], False)


@pytest.mark.parametrize(
    "read",
    [
        b": ping\n\ndata: {}\n\n",  # a comment first
        b"data: {}\r\n\r\n",  # CRLF framing
        b'data: {"a":\n\n',  # ends mid-object
        b"data: {}\n\ndata: {",  # an unfinished event at the end
        b"event: x\ndata: {}\n\n",  # a named event
        b'data: {"choices":\r[]}\n\n',  # a bare CR ends the line: the event is `{"choices":`
        b'data: {"choices":\n[]}\n\n',  # so does an LF: the second line is a field named `[]}`
    ],
)
def test_other_reads_go_to_the_decoder(read: bytes) -> None:
    assert data_array(read) is None


def test_events_merged_into_one_object_are_caught_by_their_count() -> None:
    # Two broken events whose data, joined by a comma, would make one valid object.
    read = b'data: {"a":1\n\ndata: "b":2}\n\n'
    array, count, _ = data_array(read) or (b"", 0, False)
    assert json.loads(array) == [{"a": 1, "b": 2}] and count == 2
    with pytest.raises(ChatgateError, match="not JSON"):
        _read_texts(read, SSEDecoder(), ChatTrace())


def test_a_read_of_one_event_is_parsed_alone() -> None:
    # What a model server writes while it generates: one event per token, one write each.
    read = b"data: " + json.dumps(chunk_object("tok")).encode() + b"\n\n"
    assert one_event_data(read) == read[len(b"data: ") : -2]
    assert _read_texts(read, SSEDecoder(), ChatTrace()) == (["tok"], False)


@pytest.mark.parametrize(
    "read",
    [
        b"data: {}\n\ndata: {}\n\n",  # two events
        b'data: {"a":1,\n"b":2}\n\n',  # two lines: the second is a field named `"b"`, ignored
        b'data: {"a":1,\r"b":2}\n\n',  # a bare CR ends a line too
        b"data: {}\r\n\r\n",  # CRLF framing
        b"data: [DONE]\n\n",
        b": ping\n\ndata: {}\n\n",
        b"data:{}\n\n",  # no space: its own data is the same, but not this path's shape
        b'data: {"a":1}\n',  # not ended yet
    ],
)
def test_only_a_whole_one_line_event_is_read_alone(read: bytes) -> None:
    assert one_event_data(read) is None
    assert relay([read], _read_texts) == relay([read], through_decoder)
