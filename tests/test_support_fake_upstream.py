"""The fake upstream, exercised over real loopback HTTP the way chatgate will talk to it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.support import FakeUpstream, scripts, unique_name
from tests.support.openai_shapes import DEFAULT_REPLY


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        yield client


def chat(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def data_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of a well-formed LF-framed stream, JSON-decoded except [DONE]."""
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_default_stream_is_openai_shaped(fake: FakeUpstream, client: httpx.Client) -> None:
    response = client.post(fake.base_url + "/chat/completions", json=chat(unique_name()))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = data_events(response.content)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert content == DEFAULT_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in e for e in chunks)


def test_include_usage_adds_a_usage_chunk_before_done(fake: FakeUpstream, client: httpx.Client) -> None:
    body = chat(unique_name(), stream_options={"include_usage": True})
    events = data_events(client.post(fake.base_url + "/chat/completions", json=body).content)

    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["total_tokens"] == events[-2]["usage"]["prompt_tokens"] + 5


def test_default_non_stream_is_a_completion(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    response = client.post(fake.url("/prefix/v1/chat/completions"), json=chat(name, stream=False))

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == name
    assert body["choices"][0]["message"] == {"role": "assistant", "content": DEFAULT_REPLY}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_models_lists_defaults_and_scripted_names(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, scripts.stream("x"))

    body = client.get(fake.base_url + "/models").json()

    assert body["object"] == "list"
    assert {"fake-model", name} <= {m["id"] for m in body["data"]}


def test_unknown_route_is_404(fake: FakeUpstream, client: httpx.Client) -> None:
    assert client.post(fake.url("/v1/embeddings"), json={}).status_code == 404


@pytest.mark.parametrize(
    ("script", "status", "expected"),
    [
        (scripts.error(401, "Incorrect API key provided"), 401, {"error": {"message": "Incorrect API key provided"}}),
        (scripts.body(422, {"detail": "bad things"}), 422, {"detail": "bad things"}),
        (scripts.body(503, "upstream is sad"), 503, "upstream is sad"),
    ],
)
def test_error_bodies(fake: FakeUpstream, client: httpx.Client, script: Any, status: int, expected: Any) -> None:
    name = unique_name()
    fake.script(name, script)

    response = client.post(fake.base_url + "/chat/completions", json=chat(name))

    assert response.status_code == status
    assert "transfer-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    if isinstance(expected, str):
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text == expected
    else:
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body.get("detail") == expected.get("detail")
        assert body.get("error", {}).get("message") == expected.get("error", {}).get("message")


def test_script_headers_and_status_apply_to_streams(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"status": 429, "headers": {"retry-after": "7"}, "steps": [{"send": "slow down"}]})

    response = client.post(fake.base_url + "/chat/completions", json=chat(name))

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.text == "slow down"


def test_a_list_of_scripts_is_followed_in_order_and_the_last_repeats(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, [scripts.error(500, "boom"), scripts.stream("ok")])

    statuses = [client.post(fake.base_url + "/chat/completions", json=chat(name)).status_code for _ in range(3)]

    assert statuses == [500, 200, 200]


def test_invalid_script_is_rejected(fake: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="unknown step"):
        fake.script(unique_name(), {"steps": [{"explode": True}]})


def test_send_and_send_hex_arrive_byte_for_byte(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    # "é" is C3 A9: split across two writes, inside CR-, CRLF- and LF-framed events with a comment.
    steps: list[scripts.Step] = [
        {"send": ": ping\r\n\r\n"},
        {"send": 'data: {"x":"\\u00e9"}\r'},
        {"send": "\r"},
        {"send_hex": "646174613a20c3"},
        {"send_hex": "a90a0a"},
        {"done": True},
    ]
    fake.script(name, {"steps": steps})

    with client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response:
        raw = b"".join(response.iter_raw())

    assert raw == b': ping\r\n\r\ndata: {"x":"\\u00e9"}\r\rdata: \xc3\xa9\n\ndata: [DONE]\n\n'


def test_each_step_is_its_own_write(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"delta": "a"}, {"sleep": 0.3}, {"delta": "b"}, {"done": True}]})

    arrivals: list[tuple[float, bytes]] = []
    with client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response:
        for piece in response.iter_raw():
            arrivals.append((time.monotonic(), piece))

    assert len(arrivals) >= 2
    assert b'"a"' in arrivals[0][1] and b'"b"' not in arrivals[0][1]
    b_time = next(t for t, piece in arrivals if b'"b"' in piece)
    assert b_time - arrivals[0][0] >= 0.25


def test_gate_blocks_until_released(fake: FakeUpstream, client: httpx.Client) -> None:
    name, gate = unique_name(), unique_name("gate")
    fake.script(name, {"steps": [{"delta": "before"}, {"wait": gate}, {"delta": "after"}, {"done": True}]})

    with client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response:
        pieces = response.iter_raw()
        first = next(pieces)
        fake.wait_for_gate(gate)
        released_at = time.monotonic()
        fake.release(gate)
        rest = b"".join(pieces)
        finished_at = time.monotonic()

    assert b"before" in first and b"after" not in first
    assert b"after" in rest and rest.endswith(b"data: [DONE]\n\n")
    assert finished_at >= released_at
    assert fake.gates()["waiting"].get(gate, 0) == 0
    assert gate in fake.gates()["released"]


def test_cut_breaks_the_stream_at_the_client(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"delta": "partial"}, {"sleep": 0.1}, {"cut": True}]})

    received = b""
    with (
        pytest.raises(httpx.TransportError),
        client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response,
    ):
        for piece in response.iter_raw():
            received += piece

    assert b"partial" in received
    (connection,) = fake.wait_for_closed(name)
    assert connection["closed_by"] == "server"


def test_cut_as_first_step_sends_nothing(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"cut": True}]})

    with pytest.raises(httpx.TransportError):
        client.post(fake.base_url + "/chat/completions", json=chat(name))


def test_close_framing_ends_the_body_by_closing(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"framing": "close", "steps": [{"delta": "x"}, {"done": True}]})

    response = client.post(fake.base_url + "/chat/completions", json=chat(name))

    assert "transfer-encoding" not in response.headers
    assert response.headers["connection"] == "close"
    assert data_events(response.content)[-1] == "[DONE]"


def test_hang_before_headers_times_out_at_the_client(fake: FakeUpstream) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"hang_before_headers": True}]})

    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.5), trust_env=False) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(fake.base_url + "/chat/completions", json=chat(name))

    (connection,) = fake.wait_for_closed(name)
    assert connection["peer_closed"] is True


def test_hang_after_headers_keeps_the_stream_open(fake: FakeUpstream) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"delta": "a"}, {"hang": True}]})

    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.5), trust_env=False) as client,
        client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response,
    ):
        assert response.status_code == 200
        pieces = response.iter_raw()
        assert b'"a"' in next(pieces)
        with pytest.raises(httpx.ReadTimeout):
            next(pieces)


def test_requests_are_recorded_in_order(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    headers = {"authorization": "Bearer sk-test-123", "x-extra": "1"}
    client.post(fake.url("/a/v1/chat/completions?x=1"), json=chat(name, temperature=0.2), headers=headers)
    client.post(fake.base_url + "/chat/completions", json=chat(name, stream=False))

    first, second = fake.requests(name)

    assert (first["method"], first["path"], first["query"]) == ("POST", "/a/v1/chat/completions", "x=1")
    assert first["headers"]["authorization"] == "Bearer sk-test-123"
    assert first["headers"]["x-extra"] == "1"
    assert first["body"]["temperature"] == 0.2
    assert first["model"] == name
    assert json.loads(first["raw_body"]) == first["body"]
    assert second["body"]["stream"] is False
    assert first["id"] < second["id"]
    assert first["time"] <= second["time"]


def test_peer_close_mid_stream_is_recorded_within_a_second(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"delta": "a"}, {"hang": True}]})

    with client.stream("POST", fake.base_url + "/chat/completions", json=chat(name)) as response:
        pieces = response.iter_raw()  # kept: dropping a half-read iterator closes the connection
        next(pieces)
        (open_connection,) = fake.connections(name)
        assert open_connection["closed"] is None
    closed_at = time.time()  # leaving the block closes the streamed response's connection

    (connection,) = fake.wait_for_closed(name, timeout=1.0)
    assert connection["peer_closed"] is True
    assert connection["closed_by"] == "peer"
    assert connection["closed"] is not None
    assert connection["opened"] <= connection["closed"] <= closed_at + 1.0
    assert connection["requests"] == [r["id"] for r in fake.requests(name)]


def test_keep_alive_connection_carries_several_requests(fake: FakeUpstream, client: httpx.Client) -> None:
    name = unique_name()
    for _ in range(2):
        client.post(fake.base_url + "/chat/completions", json=chat(name))

    (connection,) = fake.connections(name)

    assert connection["closed"] is None
    assert connection["models"] == [name, name]


def test_raw_socket_sees_chunked_framing(fake: FakeUpstream) -> None:
    name = unique_name()
    fake.script(name, {"steps": [{"send": "ab"}, {"send": "c"}]})
    body = json.dumps(chat(name)).encode()
    host, port = fake.root_url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk

    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")


def test_reset_forgets_everything(tmp_path: Any) -> None:
    # A private process: resetting the session's fake would race with other tests' records.
    with FakeUpstream.launch(tmp_path) as fake, httpx.Client(timeout=5.0, trust_env=False) as client:
        name = unique_name()
        fake.script(name, scripts.error(500, "boom"))
        client.post(fake.base_url + "/chat/completions", json=chat(name))
        fake.release("g")

        fake.reset()

        assert fake.requests() == []
        assert fake.gates() == {"released": [], "waiting": {}}
        assert client.post(fake.base_url + "/chat/completions", json=chat(name)).status_code == 200
        process = fake.process
    assert process is not None
    assert not process.running
    assert "fake-upstream listening on http://127.0.0.1:" in process.log_text()
    assert "fake-upstream stopped" in process.log_text()
