"""The OpenAI dialect's pure parts: error shapes and model ids (api/openai_shapes.py), and the
stream relay (api/chat_openai.py) fed upstream reads in-process (what is complete, what is an event
stream, key masking)."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import orjson
import pytest

from chatgate.api.chat_openai import _StreamRelay
from chatgate.api.openai_shapes import model_ids, render_error
from chatgate.api.relay import require_event_stream
from chatgate.errors import (
    AmbiguousModel,
    ChatgateError,
    ModelNotFound,
    RateLimited,
    Unauthorized,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
)
from chatgate.registry import ModelRecord
from chatgate.trace import ChatTrace


@pytest.mark.parametrize(
    ("exc", "type_", "code"),
    [
        (AmbiguousModel("m", param="model"), "invalid_request_error", "ambiguous_model"),
        (Unauthorized("m"), "authentication_error", "invalid_credentials"),
        (ModelNotFound("m", param="model"), "invalid_request_error", "model_not_found"),
        (RateLimited("m", retry_after=3), "rate_limit_error", "rate_limited"),
        (UpstreamTimeout("m"), "api_error", "upstream_timeout"),
        (ChatgateError("m"), "api_error", "internal_error"),
    ],
)
def test_errors_take_openais_shape(exc: ChatgateError, type_: str, code: str) -> None:
    assert render_error(exc) == {"error": {"message": "m", "type": type_, "param": exc.param, "code": code}}


def test_an_upstream_error_object_passes_through() -> None:
    body = b'{"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}'
    assert render_error(UpstreamStatus(400, "too long", body=body)) == {
        "error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}
    }


@pytest.mark.parametrize("body", [b"", b"plain text", b'{"detail": "x"}', b'{"error": "a string"}'])
def test_other_upstream_error_bodies_are_wrapped(body: bytes) -> None:
    error = render_error(UpstreamStatus(503, "x", body=body))["error"]
    assert (error["message"], error["type"]) == ("x", "api_error")


def record(name: str) -> ModelRecord:
    return ModelRecord(id=uuid.uuid4(), user_id=uuid.uuid4(), name=name, base_url="", model_id="m", api_key="")


def test_model_id_is_the_name_unless_it_is_shared() -> None:
    a, b1, b2 = record("a"), record("b"), record("b")
    assert model_ids([a, b1, b2]) == [("a", a), (str(b1.id), b1), (str(b2.id), b2)]


# ----- the stream relay, fed reads in-process ------------------------------------------------


class Reads:
    """What `_StreamRelay` uses of an upstream `Response`: its headers and its reads."""

    def __init__(self, *reads: bytes, content_type: bytes = b"text/event-stream") -> None:
        self.headers = [(b"content-type", content_type)]
        self._reads = list(reads)

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)

    async def next_chunk(self) -> bytes | None:
        return self._reads.pop(0) if self._reads else None


def relayed(*reads: bytes, api_key: str = "") -> tuple[bytes, ChatTrace, BaseException | None]:
    """The body the relay sent for these reads, its trace, and what it raised."""
    sent: list[bytes] = []
    trace = ChatTrace()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    relay = _StreamRelay(send, None, trace, [], strip_usage=False, api_key=api_key)
    try:
        asyncio.run(relay(Reads(*reads)))  # type: ignore[arg-type]
    except ChatgateError as exc:
        return b"".join(sent), trace, exc
    return b"".join(sent), trace, None


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DELTA = event({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
FINISH = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def test_a_stream_without_done_or_finish_is_a_cut() -> None:
    body, _, raised = relayed(DELTA, DELTA)
    assert body == DELTA * 2  # what came is relayed; no [DONE] follows it
    assert isinstance(raised, UpstreamIncomplete)


def test_a_stream_whose_last_choice_finished_gets_its_done() -> None:
    usage = event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    body, trace, raised = relayed(DELTA, FINISH, usage)
    assert raised is None
    assert body == DELTA + FINISH + usage + b"data: [DONE]\n\n"
    assert trace.status == 200


def test_an_answer_without_events_is_refused_before_the_first_byte() -> None:
    body, trace, raised = relayed(b": ping\n\n", b"hello\n\n")
    assert (body, trace.started) == (b"", False)
    assert isinstance(raised, UpstreamIncomplete)


def test_an_error_event_echoing_the_key_is_masked_and_ends_the_stream() -> None:
    key = "sk-secret-key-0123456789wxyz"
    error = event({"error": {"message": f"Incorrect API key provided: {key}"}})
    body, trace, raised = relayed(DELTA, error, api_key=key)
    assert raised is None
    assert key.encode() not in body
    assert body == DELTA + error.replace(key.encode(), "sk-…wxyz".encode())  # and no [DONE] after it
    assert (trace.status, trace.error) == (502, "Incorrect API key provided: sk-…wxyz")


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({b"content-type": b"text/event-stream; charset=utf-8"}, None),
        ({b"content-type": b"text/plain"}, None),
        ({}, None),
        ({b"content-type": b"text/event-stream", b"content-encoding": b"identity"}, None),
        ({b"content-type": b"application/json"}, "answered application/json, not an event stream"),
        ({b"content-type": b"Text/HTML; charset=x"}, "answered text/html, not an event stream"),
        ({b"content-type": b"text/event-stream", b"content-encoding": b"gzip"}, "Content-Encoding gzip"),
        ({b"content-encoding": b"br\x00\r\nx"}, "Content-Encoding br???x"),
    ],
)
def test_what_is_read_as_an_event_stream(headers: dict[bytes, bytes], refused: str | None) -> None:
    response = Reads()
    response.headers = list(headers.items())
    if refused is None:
        require_event_stream(response)  # type: ignore[arg-type]
    else:
        with pytest.raises(UpstreamProtocolError, match=re.escape(refused)):
            require_event_stream(response)  # type: ignore[arg-type]
