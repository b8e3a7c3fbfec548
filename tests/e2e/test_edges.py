"""Broken and hostile model servers, through real processes: client → chatgate → the fake upstream
scripted to misbehave (issue #10, "What is broken" 2 to 7; request body sizes are tested elsewhere).

Each case checks what a user would notice, on both chat routes (and streamed or not where that
applies): the status and body, whether the client can tell an answer is incomplete (the custom
route leaves its chunked body unterminated, which httpx raises on; `/v1` ends with an error event
and no `[DONE]`), whether the upstream connection was dropped, the usage row, and the log line.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name, wait_until
from tests.support import openai_shapes as shapes

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-proj-edgecase-secret-0123456789abcdef"
MASKED = "sk-…cdef"


class Answer(NamedTuple):
    status: int
    headers: httpx.Headers
    body: bytes
    failure: httpx.HTTPError | None  # raised while reading the body: the client saw it cut

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]

    def events(self) -> list[str]:
        """The data of each SSE event (a `/v1` stream)."""
        text = self.body.decode()
        return [block[6:] for block in text.split("\n\n") if block.startswith("data: ")]


def register(gateway: ChatgateServer, fake: FakeUpstream, script: Any = None, **fields: Any) -> tuple[str, str]:
    """A model whose upstream follows `script`; returns (its chatgate id, the upstream model name)."""
    name = unique_name("edge")
    if script is not None:
        fake.script(name, script)
    fields.setdefault("api_key", KEY)
    return gateway.add_model(base_url=fake.base_url, model_id=name, **fields), name


def ask(gateway: ChatgateServer, route: str, model_id: str) -> Answer:
    """One chat on `route` ("custom", "stream" or "json"), read to its end or its failure."""
    if route == "custom":
        path = "/api/chat/custom"
        payload: dict[str, Any] = {"chatSettings": {}, "messages": MESSAGES, "customModelId": model_id}
    else:
        path = "/v1/chat/completions"
        payload = {"model": model_id, "messages": MESSAGES, "stream": route == "stream"}
    received = b""
    with gateway.client() as http, http.stream("POST", path, json=payload) as response:
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.HTTPError as exc:
            return Answer(response.status_code, response.headers, received, exc)
        return Answer(response.status_code, response.headers, received, None)


def usage_row(gateway: ChatgateServer, model_id: str) -> dict[str, Any]:
    """The chat's usage row, once the usage writer has flushed it."""

    def fetch() -> dict[str, Any] | None:
        with gateway.client() as http:
            rows = http.get("/api/usage", params={"model": model_id}).json()["data"]
        return rows[0] if rows else None

    row: dict[str, Any] = wait_until(fetch, timeout=5.0)
    return row


def logged(gateway: ChatgateServer, request_id: str, text: str) -> str:
    """The log line of this request that says `text` (waits for it)."""

    def find() -> str | None:
        for line in gateway.log_text().splitlines():
            if f"request {request_id}" in line and text in line:
                return line
        return None

    line: str = wait_until(find, timeout=5.0)
    return line


def assert_cut(answer: Answer, route: str, sent: bytes) -> None:
    """The client got what was sent before the failure and can tell that the answer is incomplete."""
    assert answer.status == 200
    if route == "custom":
        assert answer.body == sent
        assert isinstance(answer.failure, httpx.RemoteProtocolError)  # unterminated chunked body
    else:
        assert answer.failure is None
        events = answer.events()
        assert "[DONE]" not in events
        assert "error" in json.loads(events[-1])


def assert_502(answer: Answer, route: str, says: str) -> str:
    """A clear 502 before the first byte, in the route's error shape; returns its message."""
    assert answer.status == 502, answer.body
    body = json.loads(answer.body)
    message: str = body["message"] if route == "custom" else body["error"]["message"]
    assert says in message
    return message


STREAM_ROUTES = ["custom", "stream"]


# ----- 3. a cut stream is not a complete one ------------------------------------------------


CUTS = {
    # No length and no chunking: the body ends with the connection, here mid-answer (a FIN).
    "close-delimited, closed mid-answer": {"framing": "close", "steps": [{"delta": "partial "}, {"close": True}]},
    # A clean chunked end, but neither a finish_reason nor [DONE]: the server stopped short.
    "chunked, ended without finish or [DONE]": {"steps": [{"delta": "partial "}, {"sleep": 0.05}]},
}


@pytest.mark.parametrize("route", STREAM_ROUTES)
@pytest.mark.parametrize("script", CUTS.values(), ids=CUTS.keys())
def test_a_cut_stream_is_passed_on_as_cut(
    gateway: ChatgateServer, fake: FakeUpstream, route: str, script: dict[str, Any]
) -> None:
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, route, model_id)
    assert_cut(answer, route, b"partial ")
    if route == "stream":
        assert '"content":"partial "' in answer.events()[0]
    row = usage_row(gateway, model_id)
    assert row["status"] == 502
    assert "before it was complete" in row["error"]
    logged(gateway, answer.request_id, "before it was complete")


def test_a_stream_cut_before_any_text_is_a_502(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, _ = register(gateway, fake, {"framing": "close", "steps": [{"role": "assistant"}, {"close": True}]})
    answer = ask(gateway, "custom", model_id)
    assert_502(answer, "custom", "ended the stream before it was complete")
    assert usage_row(gateway, model_id)["status"] == 502
    logged(gateway, answer.request_id, "before it was complete")


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_a_stream_cut_before_any_event_is_a_502(gateway: ChatgateServer, fake: FakeUpstream, route: str) -> None:
    model_id, _ = register(gateway, fake, {"framing": "close", "steps": [{"headers": True}, {"close": True}]})
    answer = ask(gateway, route, model_id)
    assert_502(answer, route, "ended without any event")
    assert usage_row(gateway, model_id)["status"] == 502


COMPLETE_WITHOUT_DONE = {
    "chunked": {"steps": [{"delta": "whole"}, {"finish": "stop"}, {"usage": True}]},
    "close-delimited": {"framing": "close", "steps": [{"delta": "whole"}, {"finish": "length"}, {"close": True}]},
}


@pytest.mark.parametrize("route", STREAM_ROUTES)
@pytest.mark.parametrize("script", COMPLETE_WITHOUT_DONE.values(), ids=COMPLETE_WITHOUT_DONE.keys())
def test_a_stream_that_finished_without_done_is_complete(
    gateway: ChatgateServer, fake: FakeUpstream, route: str, script: dict[str, Any]
) -> None:
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, route, model_id)
    assert (answer.status, answer.failure) == (200, None)
    if route == "custom":
        assert answer.body == b"whole"
    else:
        assert answer.events()[-1] == "[DONE]"  # its last choice finished: the end is chatgate's to mark
    assert usage_row(gateway, model_id)["status"] == 200


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_a_reset_is_never_a_clean_end(gateway: ChatgateServer, fake: FakeUpstream, route: str) -> None:
    # Even after a finish_reason: a close-delimited body ended by a reset (ECONNRESET) is broken.
    steps = [{"delta": "partial "}, {"finish": "stop"}, {"sleep": 0.05}, {"cut": True}]
    model_id, _ = register(gateway, fake, {"framing": "close", "steps": steps})
    answer = ask(gateway, route, model_id)
    assert_cut(answer, route, b"partial ")
    assert usage_row(gateway, model_id)["status"] == 502


def test_a_reset_of_a_close_delimited_answer_is_a_502(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n"
    steps = [{"send": head + '{"id": "chatcmpl-1", "choices": [{"mess'}, {"sleep": 0.05}, {"cut": True}]
    model_id, _ = register(gateway, fake, {"framing": "raw", "steps": steps})
    assert_502(ask(gateway, "json", model_id), "json", "")


# ----- 2. interim (1xx) answers ----------------------------------------------------------


@pytest.mark.parametrize("route", ["custom", "stream", "json"])
def test_early_hints_then_the_answer_and_the_next_chat_gets_its_own(
    gateway: ChatgateServer, fake: FakeUpstream, route: str
) -> None:
    if route == "json":
        first: dict[str, Any] = {
            "steps": [{"informational": 103}, {"body": shapes.completion("m", "first answer", shapes.usage())}]
        }
    else:
        first = {"steps": [{"informational": 103}, *scripts.stream("first answer")["steps"]]}
    hinted, _ = register(gateway, fake, first)
    if route == "json":
        second = scripts.body(200, shapes.completion("m", "second answer", shapes.usage()))
    else:
        second = scripts.stream("second answer")
    other, _ = register(gateway, fake, second)
    answer = ask(gateway, route, hinted)
    assert (answer.status, answer.failure) == (200, None)
    assert b"first answer" in answer.body
    # The same host, another model and key: a reused connection must not hold the first's answer.
    following = ask(gateway, route, other)
    assert (following.status, following.failure) == (200, None)
    assert b"second answer" in following.body
    assert b"first answer" not in following.body


def test_switching_protocols_is_refused(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, _ = register(gateway, fake, {"steps": [{"informational": 101}, *scripts.stream("no")["steps"]]})
    for route in STREAM_ROUTES:
        assert ask(gateway, route, model_id).status == 502


# ----- 4. everything a model server sends back is bounded --------------------------------


@pytest.mark.parametrize("route", ["custom", "stream", "json"])
def test_a_response_head_over_64_kib_is_a_502(gateway: ChatgateServer, fake: FakeUpstream, route: str) -> None:
    script = (
        scripts.stream("never")
        if route != "json"
        else scripts.body(200, shapes.completion("m", "never", shapes.usage()))
    )
    script["headers"] = {f"x-filler-{i}": "v" * 8000 for i in range(9)}
    model_id, _ = register(gateway, fake, script)
    assert ask(gateway, route, model_id).status == 502


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_an_endless_event_fails_fast_with_bounded_cpu_and_memory(
    gateway: ChatgateServer, fake: FakeUpstream, route: str
) -> None:
    # 64 MB without an event boundary: one SSE event is bounded (a few MiB), then the stream fails.
    assert gateway.process is not None and gateway.process.proc is not None
    pid = gateway.process.proc.pid
    model_id, name = register(gateway, fake, {"steps": [{"send": "data: "}, {"flood": ["x", 64 * 1024 * 1024]}]})
    cpu, peak = _cpu_seconds(pid), _peak_rss_mib(pid)
    started = time.monotonic()
    answer = ask(gateway, route, model_id)
    elapsed = time.monotonic() - started
    assert_502(answer, route, "without ending an event")
    assert elapsed < 10
    assert _cpu_seconds(pid) - cpu < 5  # the quadratic decoder took about 20 s of CPU for this
    assert _peak_rss_mib(pid) - peak < 64  # nowhere near the 64 MB sent
    (connection,) = fake.wait_for_closed(name)
    assert connection["peer_closed"]  # chatgate dropped the connection: the flood stops
    logged(gateway, answer.request_id, "without ending an event")


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_an_endless_event_after_the_first_text_cuts_the_answer(
    gateway: ChatgateServer, fake: FakeUpstream, route: str
) -> None:
    steps = [{"delta": "partial "}, {"sleep": 0.05}, {"send": "data: "}, {"flood": ["y", 16 * 1024 * 1024]}]
    model_id, _ = register(gateway, fake, {"steps": steps})
    answer = ask(gateway, route, model_id)
    assert_cut(answer, route, b"partial ")
    assert usage_row(gateway, model_id)["status"] == 502


def test_a_non_streamed_body_over_the_limit_is_a_502(make_chatgate: Any, fake: FakeUpstream, tmp_path: Path) -> None:
    server: ChatgateServer = make_chatgate(max_response_bytes=1024 * 1024)
    model_id, name = register(
        server, fake, scripts.body(200, shapes.completion("m", "z" * (3 * 1024 * 1024), shapes.usage()))
    )
    assert ask(server, "json", model_id).status == 502
    (connection,) = fake.wait_for_closed(name)
    assert connection["peer_closed"]


# ----- 5. answers that are not an event stream --------------------------------------------


NOT_SSE = {
    "a JSON body": (
        scripts.body(200, shapes.completion("m", "not streamed", shapes.usage())),
        "application/json, not an event stream",
    ),
    "an HTML page": (
        {"headers": {"content-type": "text/html"}, "steps": [{"send": "<html><body>Bad gateway</body></html>"}]},
        "text/html, not an event stream",
    ),
    "lines without data:": ({"steps": [{"send": "hello\nworld\n\n"}]}, "ended without any event"),
    "a gzip body": (
        {
            "headers": {"content-encoding": "gzip"},
            "steps": [{"send_hex": gzip.compress(shapes.sse(shapes.chunk("m", content="hi")) + shapes.DONE).hex()}],
        },
        "Content-Encoding gzip",
    ),
}


@pytest.mark.parametrize("route", STREAM_ROUTES)
@pytest.mark.parametrize(("script", "says"), NOT_SSE.values(), ids=NOT_SSE.keys())
def test_an_answer_that_is_not_an_event_stream_is_a_502(
    gateway: ChatgateServer, fake: FakeUpstream, route: str, script: dict[str, Any], says: str
) -> None:
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, route, model_id)
    assert_502(answer, route, says)
    row = usage_row(gateway, model_id)
    assert row["status"] == 502
    assert says in row["error"]
    logged(gateway, answer.request_id, says)


@pytest.mark.parametrize("route", STREAM_ROUTES)
@pytest.mark.parametrize("content_type", ["text/event-stream", "text/event-stream; charset=utf-8", "text/plain"])
def test_sse_under_a_liberal_content_type_is_read(
    gateway: ChatgateServer, fake: FakeUpstream, route: str, content_type: str
) -> None:
    script = scripts.stream("fine")
    script["headers"] = {"content-type": content_type}
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, route, model_id)
    assert (answer.status, answer.failure) == (200, None)
    assert b"fine" in answer.body


# ----- 6. an in-band error never carries the model's key ----------------------------------


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_an_in_band_error_echoing_the_key_is_masked_everywhere(
    gateway: ChatgateServer, fake: FakeUpstream, route: str
) -> None:
    error = {"error": {"message": f"Incorrect API key provided: {KEY}.", "type": "invalid_request_error"}}
    model_id, _ = register(gateway, fake, {"steps": [{"delta": "partial "}, {"sleep": 0.05}, {"event": error}]})
    answer = ask(gateway, route, model_id)
    assert KEY.encode() not in answer.body
    if route == "stream":
        last = json.loads(answer.events()[-1])
        assert last["error"]["message"] == f"Incorrect API key provided: {MASKED}."
        assert "[DONE]" not in answer.events()
    else:
        assert_cut(answer, route, b"partial ")
    row = usage_row(gateway, model_id)
    assert row["status"] == 502
    assert KEY not in row["error"] and MASKED in row["error"]
    logged(gateway, answer.request_id, MASKED)
    assert KEY not in gateway.log_text()


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_an_in_band_error_before_any_text_is_masked(gateway: ChatgateServer, fake: FakeUpstream, route: str) -> None:
    error = {"error": {"message": f"Incorrect API key provided: {KEY}."}}
    model_id, _ = register(gateway, fake, {"steps": [{"role": "assistant"}, {"event": error}]})
    answer = ask(gateway, route, model_id)
    assert KEY.encode() not in answer.body
    assert KEY not in usage_row(gateway, model_id)["error"]
    assert KEY not in gateway.log_text()


# ----- 7. Retry-After passes through --------------------------------------------------------


@pytest.mark.parametrize("route", ["custom", "stream", "json"])
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_passed_on(gateway: ChatgateServer, fake: FakeUpstream, route: str, status: int) -> None:
    script = scripts.error(status, "slow down")
    script["headers"] = {"retry-after": "2", "retry-after-ms": "2000"}
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, route, model_id)
    assert answer.status == status
    assert (answer.headers.get("retry-after"), answer.headers.get("retry-after-ms")) == ("2", "2000")


def test_retry_after_as_a_date_passes_and_anything_else_is_dropped(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    script = scripts.error(429, "slow down")
    script["headers"] = {"retry-after": date, "retry-after-ms": "2000; <script>alert(1)</script>"}
    model_id, _ = register(gateway, fake, script)
    answer = ask(gateway, "json", model_id)
    assert answer.headers.get("retry-after") == date
    assert "retry-after-ms" not in answer.headers


# ----- 8. every answer names its request ----------------------------------------------------


def test_a_successful_custom_answer_has_its_request_id(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, _ = register(gateway, fake, scripts.stream("Hello"))
    answer = ask(gateway, "custom", model_id)
    assert (answer.status, answer.body) == (200, b"Hello")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert usage_row(gateway, model_id)["request_id"] == answer.request_id
