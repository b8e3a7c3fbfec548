"""Fuzzing with a bounded budget: hypothesis on the SSE decoder and the chat body parsing, and
schemathesis against chatgate's own OpenAPI document through a real server. Zero 5xx.

For the chat endpoints a 502 or 504 is the upstream's failure reported as such (a fuzzed model
id that exists points nowhere reachable), not a server error: those two statuses are allowed
there, and only there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from tests.support import ChatgateServer

from chatgate.api.asgi import parse_json
from chatgate.api.chat_custom import _upstream_payload
from chatgate.errors import ChatgateError
from chatgate.upstream.sse import Event, SSEDecoder

# ----- the SSE decoder ------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)
_newline = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A valid stream, each line ended by any of LF, CR or CRLF, and the events it carries."""
    out: list[bytes] = []
    events: list[Event] = []
    for _ in range(draw(st.integers(0, 6))):
        name = b""
        data: list[bytes] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["data", "comment", "event", "id"]))
            value = draw(_text).encode()
            if kind == "data":
                data.append(value)
                out.append(b"data: " + value + draw(_newline))
            elif kind == "comment":
                out.append(b": " + value + draw(_newline))
            elif kind == "event":
                name = value.lstrip(b" ")
                out.append(b"event: " + value.lstrip(b" ") + draw(_newline))
            else:
                out.append(b"id: " + value + draw(_newline))
        out.append(draw(_newline))  # the blank line that dispatches
        if data:
            events.append(Event(name, b"\n".join(data)))
    stream = b"".join(out)
    # A CR ending followed by an LF-started blank line is one CRLF: keep the grammar unambiguous.
    return stream, events


def feed_in_pieces(stream: bytes, cuts: list[int]) -> list[Event]:
    decoder = SSEDecoder()
    events: list[Event] = []
    start = 0
    for cut in sorted(set(cuts)):
        events += decoder.feed(stream[start:cut])
        start = cut
    events += decoder.feed(stream[start:])
    return events + decoder.flush()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_of_a_stream_gives_the_events_of_the_whole(data: st.DataObject) -> None:
    stream, _expected = data.draw(sse_streams())
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    whole = SSEDecoder()
    assert feed_in_pieces(stream, cuts) == whole.feed(stream) + whole.flush()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_text, st.sampled_from(["\n", "\r\n"])), max_size=6), st.data())
def test_events_are_what_was_sent(items: list[tuple[str, str]], data: st.DataObject) -> None:
    stream = "".join(f"data: {text}{nl}: ping{nl}{nl}" for text, nl in items).encode()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert [e.data for e in feed_in_pieces(stream, cuts)] == [text.encode() for text, _ in items]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_any_bytes_in_any_split_never_raise_and_agree(stream: bytes, cuts: list[int]) -> None:
    whole = SSEDecoder()
    assert feed_in_pieces(stream, [c for c in cuts if c <= len(stream)]) == whole.feed(stream) + whole.flush()


# ----- the chat body --------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
_uuid = st.uuids().map(str)
_bodies = _json | st.fixed_dictionaries(
    {},
    optional={
        "chatSettings": _json | st.fixed_dictionaries({}, optional={"model": _json, "temperature": _json}),
        "messages": _json | st.lists(st.dictionaries(st.text(max_size=8), _json, max_size=3), max_size=3),
        "customModelId": _json | _uuid,
    },
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies)
def test_any_json_body_is_parsed_or_refused_with_a_4xx(body: Any) -> None:
    try:
        model_ref, payload = _upstream_payload(body)
    except ChatgateError as exc:
        assert 400 <= exc.status < 500
        assert exc.message
        return
    assert isinstance(model_ref, uuid.UUID)
    assert payload["stream"] is True
    assert isinstance(payload["messages"], list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100) | _json.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_are_json_or_a_400(raw: bytes) -> None:
    try:
        parse_json(raw)
    except ChatgateError as exc:
        assert exc.status == 400


# ----- schemathesis against /openapi.json -------------------------------------------------------

CHAT_PATHS = ("/api/chat/custom", "/v1/chat/completions")
UPSTREAM_STATUSES = (502, 504)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """A server with the default upstream policy and short upstream timeouts."""
    env = {"allow_private_upstreams": False, "connect_timeout": 1, "first_byte_timeout": 1, "idle_timeout": 1}
    with ChatgateServer(tmp_path_factory.mktemp("fuzz"), env) as server:
        yield server


def check_case(case: Any, server: ChatgateServer) -> None:
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=10)
    status = response.status_code
    if case.path in CHAT_PATHS and status in UPSTREAM_STATUSES:
        return
    assert status < 500, f"{case.method} {case.formatted_path} -> {status}: {response.text[:300]}"
    if status >= 400:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body["message"]
        assert isinstance(message, str) and message


def test_openapi_operations_never_answer_5xx(fuzzed: ChatgateServer) -> None:
    """Every operation of /openapi.json, with valid and with invalid inputs, 15 examples each.

    Driven through `operation.as_strategy()` rather than `schemathesis.pytest.from_fixture`,
    whose lazy loader does not work with pytest 9 (it sets `Function._nodeid`)."""
    with fuzzed.client() as client:
        document = client.get("/openapi.json").raise_for_status().json()
    document["servers"] = [{"url": fuzzed.url}]
    api = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                check_case(case, fuzzed)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation with no input to get wrong


def test_the_openapi_document_describes_the_chat_routes(fuzzed: ChatgateServer) -> None:
    with fuzzed.client() as client:
        document = client.get("/openapi.json").json()
    chat = document["paths"]["/api/chat/custom"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "chatSettings",
        "messages",
        "customModelId",
    ]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/healthz"]["get"]["security"] == []
    assert document["paths"]["/readyz"]["get"]["security"] == []
    assert httpx.get(fuzzed.url + "/openapi.json", trust_env=False).status_code == 401
