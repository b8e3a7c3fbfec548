"""The access line of each chat (text and JSON), and `X-Request-ID` on every response."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]

API_KEY = "sk-secret-key-never-logged-0123"
GENERATED = re.compile(r"[0-9a-f]{32}")


def chat(server: ChatgateServer, model_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    payload = {"chatSettings": {}, "messages": [{"role": "user", "content": "tell no one"}], "customModelId": model_id}
    with server.client() as client:
        return client.post("/api/chat/custom", json=payload, headers=headers or {})


def json_lines(server: ChatgateServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]


def test_json_access_line_with_the_clients_request_id(
    make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_chatgate(log_format="json")
    name = unique_name("m")
    fake.script(name, {"steps": [{"delta": "Hi"}, {"usage": True}, {"done": True}]})
    model_id = server.add_model(base_url=fake.base_url, model_id=name, api_key=API_KEY)
    response = chat(server, model_id, {"X-Request-ID": "front-end:42/a.b"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "front-end:42/a.b"

    def access() -> list[dict[str, Any]]:
        return [line for line in json_lines(server) if line.get("logger") == "chatgate.access"]

    (line,) = wait_until(access)
    assert {k: line[k] for k in ("level", "request_id", "route", "model", "status", "bytes", "client_gone")} == {
        "level": "INFO",
        "request_id": "front-end:42/a.b",
        "route": "/api/chat/custom",
        "model": name,
        "status": 200,
        "bytes": 2,
        "client_gone": False,
    }
    assert (line["prompt_tokens"], line["completion_tokens"], line["error_kind"]) == (7, 5, None)
    assert (line["attempts"], line["answered"]) == (1, model_id)
    assert line["ttfb"] > 0 and line["duration"] >= line["ttfb"]
    assert "time" in line and line["user"]
    # Every line of the server's own logging is JSON; no key, no message contents anywhere.
    assert json_lines(server)
    text = server.log_text()
    assert API_KEY not in text and "tell no one" not in text


def test_text_access_line_names_the_failure(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate()
    name = unique_name("m")
    fake.script(name, {"status": 503, "steps": [{"body": {"error": {"message": "overloaded"}}}]})
    model_id = server.add_model(base_url=fake.base_url, model_id=name, api_key=API_KEY)
    response = chat(server, model_id)
    assert response.status_code == 503
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    line = wait_until(lambda: re.search(rf"INFO chatgate\.access: chat request_id={request_id} .*", server.log_text()))
    assert f"model={name} status=503 " in line.group(0)
    # A 503 is retried once (CHATGATE_RETRY_ATTEMPTS), then answered: no model answered.
    assert line.group(0).endswith("attempts=2 answered=- client_gone=False error_kind=status")
    assert API_KEY not in server.log_text()


@pytest.mark.parametrize("given", ["has space", "x" * 129, 'quote"d', "é"])
def test_an_insane_request_id_is_replaced(chatgate_server: ChatgateServer, given: str) -> None:
    with httpx.Client(base_url=chatgate_server.url, trust_env=False) as client:
        response = client.get("/healthz", headers={"X-Request-ID": given.encode("utf-8")})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_every_response_carries_a_request_id(chatgate_server: ChatgateServer) -> None:
    with httpx.Client(base_url=chatgate_server.url, trust_env=False) as anonymous:
        paths = ("/healthz", "/readyz", "/", "/console/app/chat.js", "/no/such/page", "/api/models", "/metrics")
        for path, status in zip(paths, (200, 200, 200, 200, 404, 401, 401), strict=True):
            response = anonymous.get(path)
            assert response.status_code == status, path
            assert GENERATED.fullmatch(response.headers.get("x-request-id", "")), (path, response.status_code)
        unauthenticated_chat = anonymous.post("/v1/chat/completions", json={})
        assert unauthenticated_chat.status_code == 401
        assert GENERATED.fullmatch(unauthenticated_chat.headers["x-request-id"])
    with chatgate_server.client() as admin:
        kept = admin.get("/api/models", headers={"X-Request-ID": "abc-123"})
        assert kept.status_code == 200 and kept.headers["x-request-id"] == "abc-123"
        assert len(kept.headers.get_list("x-request-id")) == 1
