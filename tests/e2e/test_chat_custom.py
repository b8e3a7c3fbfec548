"""POST /api/chat/custom through real processes: client → chatgate (uvicorn) → fake upstream."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name

pytestmark = pytest.mark.e2e


def body(model_id: str, *, model: str | None = "ignored-by-default", **settings: Any) -> dict[str, Any]:
    chat_settings: dict[str, Any] = {"temperature": 0.5, **settings}
    if model is not None:
        chat_settings["model"] = model
    return {
        "chatSettings": chat_settings,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "customModelId": model_id,
    }


def scripted(gateway: ChatgateServer, fake: FakeUpstream, script: Any, **fields: Any) -> tuple[str, str]:
    """Register a model whose upstream follows `script`; returns (chatgate id, upstream model name)."""
    name = unique_name("m")
    fake.script(name, script)
    return gateway.add_model(base_url=fake.base_url, model_id=name, **fields), name


def post(gateway: ChatgateServer, payload: Any, **kwargs: Any) -> httpx.Response:
    with gateway.client() as client:
        return client.post("/api/chat/custom", json=payload, **kwargs)


def test_streams_the_delta_texts_as_plain_text(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = scripted(
        gateway,
        fake,
        {
            "steps": [
                {"role": "assistant"},
                {"send": ": ping\n\n"},
                {"delta": "\n  "},
                {"delta": " Hello"},
                {"event": {"choices": [{"index": 0, "delta": {}}]}},
                {"delta": ", world"},
                {"usage": True},
                {"done": True},
            ]
        },
    )
    response = post(gateway, body(model_id, model=name))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    # Leading whitespace of the whole answer is trimmed, the rest kept as sent.
    assert response.text == "Hello, world"


def test_upstream_request_is_what_the_seed_sent(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = unique_name("m")
    model_id = gateway.add_model(base_url=fake.base_url + "/", model_id=name, api_key="sk-upstream-key-123456")
    image = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    payload = body(model_id, model=name, temperature=0.25)
    payload["messages"].append({"role": "user", "content": image})
    payload["unknownExtra"] = {"ignored": True}
    assert post(gateway, payload).status_code == 200
    (request,) = fake.requests(model=name)
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-upstream-key-123456"
    assert request["body"] == {
        "model": name,
        "messages": payload["messages"],
        "temperature": 0.25,
        "stream": True,
        "stream_options": {"include_usage": True},  # for usage accounting; the answer is unchanged
    }


def test_model_defaults_to_the_rows_model_id_and_empty_key_sends_no_auth(
    gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    name = unique_name("m")
    model_id = gateway.add_model(base_url=fake.base_url, model_id=name, api_key="")
    assert post(gateway, body(model_id, model=None)).status_code == 200
    (request,) = fake.requests(model=name)
    assert "authorization" not in request["headers"]
    assert request["body"]["model"] == name


def test_body_is_read_as_json_without_content_type(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = scripted(gateway, fake, scripts.stream("ok"))
    with gateway.client() as client:
        response = client.post("/api/chat/custom", content=json.dumps(body(model_id, model=name)).encode())
    assert response.status_code == 200
    assert response.text == "ok"


def test_each_chunk_reaches_the_client_before_the_next_is_sent(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    gates = [unique_name("gate") for _ in range(3)]
    steps: list[dict[str, Any]] = []
    for index, gate in enumerate(gates):
        steps += [{"delta": f"part{index} "}, {"wait": gate}]
    model_id, name = scripted(gateway, fake, {"steps": [*steps, {"done": True}]})
    with gateway.client() as client, client.stream("POST", "/api/chat/custom", json=body(model_id, model=name)) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        for index, gate in enumerate(gates):
            # The upstream is parked at the gate: this chunk can only come from an immediate flush.
            assert next(chunks) == f"part{index} ".encode()
            assert fake.gates()["waiting"].get(gate) == 1
            fake.release(gate)
        assert b"".join(chunks) == b""


def test_client_disconnect_closes_the_upstream_request(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = scripted(gateway, fake, {"steps": [{"delta": "thinking"}, {"hang": True}]})
    with gateway.client() as client, client.stream("POST", "/api/chat/custom", json=body(model_id, model=name)) as r:
        assert next(r.iter_raw()) == b"thinking"
        stopped = time.time()
    (connection,) = fake.wait_for_closed(name, timeout=3.0)
    assert connection["closed"] is not None
    assert connection["closed"] - stopped < 1.0


def test_disconnect_while_waiting_for_the_first_byte_closes_upstream(
    gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    model_id, name = scripted(gateway, fake, {"steps": [{"hang_before_headers": True}]})
    with pytest.raises(httpx.ReadTimeout), gateway.client(timeout=0.5) as client:
        client.post("/api/chat/custom", json=body(model_id, model=name))
    stopped = time.time()
    (connection,) = fake.wait_for_closed(name, timeout=3.0)
    assert connection["closed"] - stopped < 1.0


def test_utf8_split_across_upstream_chunks(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    event = 'data: {"choices":[{"index":0,"delta":{"content":"héllo ✓"}}]}\n\n'.encode()
    cut = event.index("✓".encode()) + 1  # inside the three-byte check mark
    steps = [{"send_hex": event[:cut].hex()}, {"sleep": 0.05}, {"send_hex": event[cut:].hex()}, {"done": True}]
    model_id, name = scripted(gateway, fake, {"steps": steps})
    assert post(gateway, body(model_id, model=name)).text == "héllo ✓"


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n"])
def test_any_line_ending_and_split_crlf(gateway: ChatgateServer, fake: FakeUpstream, newline: str) -> None:
    events = "".join(
        f'data: {{"choices":[{{"delta":{{"content":"{word}"}}}}]}}{newline}{newline}' for word in ("a", "b", "c")
    )
    events += f"data: [DONE]{newline}{newline}"
    steps = [{"send": events[i : i + 7]} for i in range(0, len(events), 7)]
    model_id, name = scripted(gateway, fake, {"steps": steps})
    assert post(gateway, body(model_id, model=name)).text == "abc"


UPSTREAM_ERRORS = [
    # (status, upstream body, expected message): openai-node's "{status} {message}", then the seed's rewrites.
    (
        401,
        {"error": {"message": "Incorrect API key provided: sk-abc***xyz.", "type": "invalid_request_error"}},
        "Custom API Key is incorrect. Please fix it in your profile settings.",
    ),
    (
        401,
        {"error": {"message": "API KEY NOT FOUND"}},
        "Custom API Key not found. Please set it in your profile settings.",
    ),
    (404, {"error": {"message": "The model `x` does not exist"}}, "404 The model `x` does not exist"),
    (422, {"detail": "temperature must be at most 2"}, "422 temperature must be at most 2"),
    (503, "upstream overloaded", "503 upstream overloaded"),
    (500, "", "500 status code (no body)"),
]


@pytest.mark.parametrize(("status", "error", "message"), UPSTREAM_ERRORS)
def test_upstream_http_errors(
    gateway: ChatgateServer, fake: FakeUpstream, status: int, error: Any, message: str
) -> None:
    model_id, name = scripted(gateway, fake, scripts.body(status, error))
    response = post(gateway, body(model_id, model=name))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": message}


@pytest.mark.parametrize("model_ref", ["00000000-0000-4000-8000-000000000000", "not-a-uuid", "1; drop table models"])
def test_unknown_or_malformed_model_id_is_404(gateway: ChatgateServer, model_ref: str) -> None:
    response = post(gateway, body(model_ref))
    assert response.status_code == 404
    assert response.json() == {"message": "Model not found"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.pop("chatSettings"), "chatSettings"),
        (lambda b: b.update(chatSettings="x"), "chatSettings"),
        (lambda b: b.pop("messages"), "messages"),
        (lambda b: b.update(messages="hi"), "messages"),
        (lambda b: b.update(messages=["hi"]), "messages"),
        (lambda b: b.pop("customModelId"), "customModelId"),
        (lambda b: b.update(customModelId=42), "customModelId"),
        (lambda b: b["chatSettings"].update(model=7), "chatSettings.model"),
        (lambda b: b["chatSettings"].update(temperature="hot"), "chatSettings.temperature"),
    ],
)
def test_missing_or_mistyped_field_is_400_naming_it(gateway: ChatgateServer, mutate: Any, field: str) -> None:
    payload = body("00000000-0000-4000-8000-000000000000")
    mutate(payload)
    response = post(gateway, payload)
    assert response.status_code == 400
    assert response.json()["message"].startswith(field + " ")


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_body_that_is_not_a_json_object_is_400(gateway: ChatgateServer, raw: bytes) -> None:
    with gateway.client() as client:
        response = client.post("/api/chat/custom", content=raw)
    assert response.status_code == 400
    assert "message" in response.json()


def test_unreachable_upstream_is_502(gateway: ChatgateServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connection refused
        model_id = gateway.add_model(base_url=f"http://127.0.0.1:{port}/v1")
        response = post(gateway, body(model_id))
    assert response.status_code == 502
    assert "could not be reached" in response.json()["message"]


def test_no_first_byte_within_the_timeout_is_504(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = scripted(gateway, fake, {"steps": [{"hang_before_headers": True}]})
    started = time.monotonic()
    response = post(gateway, body(model_id, model=name))
    assert response.status_code == 504
    assert response.json() == {"message": "The model server sent no response within 2 s"}
    assert 1.5 < time.monotonic() - started < 5


def read_until_failure(gateway: ChatgateServer, payload: Any) -> tuple[bytes, BaseException | None]:
    received = b""
    with gateway.client() as client, client.stream("POST", "/api/chat/custom", json=payload) as response:
        assert response.status_code == 200
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.HTTPError as exc:
            return received, exc
    return received, None


@pytest.mark.parametrize(
    ("tail", "logged"),
    [
        ([{"cut": True}], "ended the stream before it was complete"),
        ([{"close": True}], "ended the stream before it was complete"),
        ([{"event": {"error": {"message": "model crashed"}}}], "model crashed"),
        ([{"hang": True}], "sent nothing for 2 s"),
    ],
)
def test_failure_after_the_first_byte_aborts_the_response(
    gateway: ChatgateServer, fake: FakeUpstream, tail: list[dict[str, Any]], logged: str
) -> None:
    model_id, name = scripted(gateway, fake, {"steps": [{"delta": "partial "}, {"sleep": 0.05}, *tail]})
    received, failure = read_until_failure(gateway, body(model_id, model=name))
    assert received == b"partial "
    assert isinstance(failure, httpx.RemoteProtocolError)  # incomplete chunked body: the client can tell
    assert logged in gateway.log_text()


def test_in_band_error_before_any_text_is_a_json_error(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    steps = [{"role": "assistant"}, {"event": {"error": {"message": "context length exceeded"}}}]
    model_id, name = scripted(gateway, fake, {"steps": steps})
    response = post(gateway, body(model_id, model=name))
    assert response.status_code == 502
    assert response.json() == {"message": "502 context length exceeded"}


def test_redirects_are_not_followed(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    script = scripts.body(307, "", headers={"location": "http://169.254.169.254/latest/meta-data"})
    model_id, name = scripted(gateway, fake, script)
    response = post(gateway, body(model_id, model=name))
    assert response.status_code == 502
    assert "redirect" in response.json()["message"]


def test_empty_base_url_means_openai(gateway: ChatgateServer) -> None:
    # No network here: the connection attempt to api.openai.com fails, which proves where it went.
    model_id = gateway.add_model(base_url="", model_id="gpt-4o-mini")
    response = post(gateway, body(model_id))
    assert response.status_code == 502
    assert response.json() == {"message": "The model server could not be reached (api.openai.com:443)"}
