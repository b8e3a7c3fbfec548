"""Hostile input: oversized, deep, mistyped or malformed bodies; huge or slow request heads;
per-user rate and stream limits. Always a 4xx with a JSON message, never a 500 or a hung worker.

What uvicorn does by itself (0.54, httptools): no limit on the size of a request head and no
timeout while one (or a body) arrives. chatgate adds both (`server.py`, `api/asgi.py`).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from tests.security.helpers import NO_SUCH_MODEL, chat, chat_body
from tests.support import ChatgateServer, FakeUpstream, unique_name

from chatgate.config import Settings

LIMIT = 64 * 1024
SLOW = 1.5


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """A server with a small body limit and a short client timeout."""
    env = {"max_body_bytes": LIMIT, "client_timeout": SLOW}
    with ChatgateServer(tmp_path_factory.mktemp("hostile"), env) as server:
        yield server


def healthy(server: ChatgateServer) -> None:
    """The worker is not hung: another request is answered at once."""
    with server.client(timeout=5) as client:
        assert client.get("/api/models").status_code == 200


def test_default_body_limit_fits_base64_images() -> None:
    assert Settings().max_body_bytes == 20 * 1024 * 1024


ROUTES = [("POST", "/api/chat/custom"), ("POST", "/api/models"), ("PATCH", f"/api/models/{NO_SUCH_MODEL}")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_413_on_every_route_by_declared_length(small: ChatgateServer, method: str, path: str) -> None:
    with small.client() as client:
        response = client.request(method, path, content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json() == {"message": f"Request body is larger than the limit of {LIMIT} bytes"}
    healthy(small)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_413_on_every_route_for_a_chunked_body(small: ChatgateServer, method: str, path: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(LIMIT // 1024 + 4):
            yield b"y" * 1024

    with small.client() as client:
        response = client.request(method, path, content=chunks())  # no Content-Length
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["message"]
    healthy(small)


def test_413_is_sent_before_the_body_is_read(small: ChatgateServer) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        head = f"POST /api/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {small.admin_token}\r\n"
        sock.sendall((head + "Content-Length: 10000000000\r\n\r\n").encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")  # answered with no body byte sent


def test_a_body_just_under_the_limit_is_read(small: ChatgateServer) -> None:
    payload = chat_body(NO_SUCH_MODEL)
    filler = LIMIT - len(orjson.dumps(payload)) - 100
    payload["messages"][0]["content"] = "z" * filler
    with small.client() as client:
        response = client.post("/api/chat/custom", content=orjson.dumps(payload))
    assert response.status_code == 404  # read and parsed whole; the model does not exist


@pytest.mark.parametrize("path", ["/api/chat/custom", "/api/models"])
@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000 + b"]" * 5000,  # deeper than orjson's 1024
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b"\xff\xfe\xfd",  # not UTF-8
        b'{"name": "\xc3\x28"}',  # an invalid UTF-8 sequence inside a string
        b'{"chatSettings": {}, "messages": [], "customModelId": "\xed\xa0\x80"}',  # a lone surrogate
        b"{" * 10 + b'"',
        b"",
        b"null",
        b"1e999999",
    ],
)
def test_malformed_json_is_a_4xx_with_a_message(small: ChatgateServer, path: str, raw: bytes) -> None:
    with small.client() as client:
        response = client.post(path, content=raw)
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["message"], str)


@pytest.mark.parametrize(
    "payload",
    [
        {"chatSettings": [], "messages": [], "customModelId": NO_SUCH_MODEL},
        {"chatSettings": {"temperature": "hot"}, "messages": [], "customModelId": NO_SUCH_MODEL},
        {"chatSettings": {"model": {"$ne": 1}}, "messages": [], "customModelId": NO_SUCH_MODEL},
        {"chatSettings": {}, "messages": {"role": "user"}, "customModelId": NO_SUCH_MODEL},
        {"chatSettings": {}, "messages": [1, 2], "customModelId": NO_SUCH_MODEL},
        {"chatSettings": {}, "messages": [], "customModelId": ["x"]},
        {"chatSettings": {}, "messages": [], "customModelId": 10**400},
    ],
)
def test_wrong_types_are_400(small: ChatgateServer, payload: Any) -> None:
    with small.client() as client:
        # json, not orjson: it writes integers of any size.
        response = client.post("/api/chat/custom", content=json.dumps(payload).encode())
    assert response.status_code == 400, response.text
    assert response.json()["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"name": 5, "base_url": [], "model_id": {}},
        {"name": "x" * 101, "base_url": "", "model_id": "m"},
        {"name": "n", "base_url": "", "model_id": "m", "context_length": "many"},
        {"name": "n", "base_url": "", "model_id": "m", "context_length": 10**30},
        {"name": "n", "base_url": "", "model_id": "m", "sharing": "everyone"},
        {"name": "n", "base_url": "", "model_id": "m", "api_key": "sk-a\nb"},
        {"name": "n", "base_url": "", "model_id": "m", "api_key": "k" * 1001},
        {"name": "n", "base_url": "", "model_id": "m", "folder_id": "not-a-uuid"},
        {"name": "n", "base_url": "", "model_id": "m", "user_id": NO_SUCH_MODEL},
    ],
)
def test_model_fields_are_checked(small: ChatgateServer, fields: dict[str, Any]) -> None:
    with small.client() as client:
        response = client.post("/api/models", json=fields)
    assert response.status_code in (400, 422), response.text
    assert response.json()["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"x-big": "a" * 100_000},
        {f"x-h{i}": "v" for i in range(8000)},
        {"cookie": "c=" + "b" * 200_000},
    ],
    ids=["one-huge-header", "many-headers", "huge-cookie"],
)
def test_huge_request_heads_are_431(small: ChatgateServer, headers: dict[str, str]) -> None:
    response = httpx.get(small.url + "/api/models", headers={**small.auth(), **headers}, trust_env=False)
    assert response.status_code == 431
    assert "headers are larger than the limit" in response.json()["message"]
    healthy(small)


def test_a_huge_url_is_431(small: ChatgateServer) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(b"GET /api/models?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, _ = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    healthy(small)


def read_answer(sock: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    sock.settimeout(SLOW * 5)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data, time.monotonic() - started
        data += piece


def test_slowloris_head_is_cut_off(small: ChatgateServer) -> None:
    with socket.create_connection(("127.0.0.1", small.port)) as sock:
        sock.sendall(b"GET /api/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer, waited = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert SLOW * 0.8 < waited < SLOW * 3
    healthy(small)


def test_a_silent_connection_is_closed(small: ChatgateServer) -> None:
    with socket.create_connection(("127.0.0.1", small.port)) as sock:
        answer, waited = read_answer(sock)
    assert answer == b""
    assert waited < SLOW * 3


@pytest.mark.parametrize("path", ["/api/chat/custom", "/api/models"])
def test_slowloris_body_is_cut_off(small: ChatgateServer, path: str) -> None:
    with socket.create_connection(("127.0.0.1", small.port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {small.admin_token}\r\n"
        sock.sendall((head + "Content-Length: 1000\r\n\r\n{").encode())
        answer, waited = read_answer_once(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Request body stalled" in answer
    assert SLOW * 0.8 < waited < SLOW * 3
    healthy(small)


def read_answer_once(sock: socket.socket) -> tuple[bytes, float]:
    """The server's whole answer (head and body may come in separate packets) and how long it took."""
    started = time.monotonic()
    sock.settimeout(SLOW * 5)
    answer = sock.recv(65536)
    waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    while match and len(body) < int(match.group(1)):
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body if match else answer, waited


# ----- per-user limits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    env = {"rate_limit_per_minute": 3, "max_concurrent_streams": 1}
    with ChatgateServer(tmp_path_factory.mktemp("limited"), env) as server:
        yield server


def test_requests_per_minute_per_user(limited: ChatgateServer) -> None:
    alice, bob = limited.new_user(), limited.new_user()
    with limited.client(alice) as client:
        assert [client.get("/api/models").status_code for _ in range(3)] == [200, 200, 200]
        refused = client.get("/api/models")
        chat_refused = client.post("/api/chat/custom", json=chat_body(NO_SUCH_MODEL))
    for response in (refused, chat_refused):
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json() == {"message": "too many requests: at most 3 a minute"}
    with limited.client(bob) as client:
        assert client.get("/api/models").status_code == 200  # another user is unaffected


def test_concurrent_streams_per_user(limited: ChatgateServer, fake: FakeUpstream) -> None:
    alice, bob = limited.new_user(), limited.new_user()
    gate, name = unique_name("gate"), unique_name("m")
    fake.script(name, {"steps": [{"delta": "first "}, {"wait": gate}, {"delta": "done"}, {"done": True}]})
    model_id = limited.add_model(alice, base_url=fake.base_url, model_id=name, sharing="public")
    results: dict[str, httpx.Response] = {}

    def long_chat() -> None:
        results["long"] = chat(limited, alice, model_id, name)

    thread = threading.Thread(target=long_chat)
    thread.start()
    try:
        fake.wait_for_gate(gate)
        second = chat(limited, alice, model_id, name)
        assert second.status_code == 429
        assert second.headers["retry-after"] == "1"
        assert second.json() == {"message": "too many concurrent streams: at most 1"}
        # bob's stream is his own slot
        bob_name = unique_name("m")
        fake.script(bob_name, {"steps": [{"delta": "bob"}, {"done": True}]})
        assert chat(limited, bob, model_id, bob_name).text == "bob"
    finally:
        fake.release(gate)
        thread.join(10)
    assert results["long"].text == "first done"
