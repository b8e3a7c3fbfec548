"""Image-sized request bodies through a real chatgate process, on every route that reads a body.

A body larger than 64 KiB arrives in several reads; the read that completed it used to be counted
as head bytes of the next request, so such requests were often refused 431. Each size is sent 20
times on one keep-alive connection (the "next request" case), the chats are checked to reach the
upstream whole, and a body over CHATGATE_MAX_BODY_BYTES (20 MiB by default) is refused with 413.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from tests.support import ChatgateServer, FakeUpstream, unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]  # the edge does not depend on the database

MB = 1_000_000
SIZES = [3 * MB, 12 * MB, 19 * MB]
LIMIT = 20 * 1024 * 1024  # the default CHATGATE_MAX_BODY_BYTES
TOO_LARGE = 21 * MB
REPEATS = 20


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    """A fake upstream of this module's own: it is reset after every chat, to hold one big body at a time."""
    with FakeUpstream.launch(tmp_path_factory.mktemp("big-bodies-upstream")) as fake:
        yield fake


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    build: Callable[[Target, int], dict[str, Any]]  # a payload of exactly `size` bytes
    expect: int
    chat: bool = True


def padding(size: int) -> str:
    """Base64 text of `size` characters, like an image's data URL."""
    return base64.b64encode(os.urandom(size * 3 // 4 + 3)).decode()[:size]


def fit(make: Callable[[str], dict[str, Any]], size: int) -> dict[str, Any]:
    """`make(filler)` with the filler sized so that the JSON body is exactly `size` bytes."""
    overhead = len(orjson.dumps(make("")))
    payload = make(padding(size - overhead))
    assert len(orjson.dumps(payload)) == size
    return payload


def image_part(data: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}}


@dataclass(frozen=True)
class Target:
    """Where the big bodies go: a model on the sink (its chatgate id and upstream name)."""

    model_id: str
    name: str
    sink: FakeUpstream


@pytest.fixture(scope="module")
def target(gateway: ChatgateServer, sink: FakeUpstream) -> Target:
    name = unique_name("big")
    return Target(gateway.add_model(base_url=sink.base_url, model_id=name), name, sink)


def custom_with_image(target: Target, size: int) -> dict[str, Any]:
    """What chatbot-ui sends for a question about a picture."""
    return fit(
        lambda data: {
            "chatSettings": {"model": target.name, "temperature": 0.5},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(data)]},
            ],
            "customModelId": target.model_id,
        },
        size,
    )


def openai_with_image(target: Target, size: int) -> dict[str, Any]:
    return fit(
        lambda data: {
            "model": target.model_id,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(data)]}],
        },
        size,
    )


def openai_long_chat(target: Target, size: int) -> dict[str, Any]:
    """A chat of 10,000 messages."""
    count = 10_000

    def make(filler: str) -> dict[str, Any]:
        share, extra = divmod(len(filler), count)
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": filler[i * share : (i + 1) * share]}
            for i in range(count)
        ]
        messages[-1]["content"] += filler[count * share :][:extra]
        return {"model": target.model_id, "messages": messages}

    return fit(make, size)


def new_model(target: Target, size: int) -> dict[str, Any]:
    """A model registration made big by the whitespace JSON allows (no field may be that long)."""
    fields = {"name": unique_name("big-model"), "base_url": target.sink.base_url, "model_id": "m", "api_key": "sk-big"}
    body = orjson.dumps(fields)
    return {"_raw": body[:-1] + b" " * (size - len(body)) + b"}"}


ROUTES = [
    Route("custom-image", "/api/chat/custom", custom_with_image, 200),
    Route("openai-image", "/v1/chat/completions", openai_with_image, 200),
    Route("openai-10000-messages", "/v1/chat/completions", openai_long_chat, 200),
    Route("models", "/api/models", new_model, 201, chat=False),
]


def body_of(payload: dict[str, Any]) -> bytes:
    raw = payload.get("_raw")
    return raw if isinstance(raw, bytes) else orjson.dumps(payload)


def received(sink: FakeUpstream) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(sink.url("/_requests?digest"), trust_env=False, timeout=30).json()
    return records


def messages_digest(messages: Any) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("size", SIZES, ids=[f"{s // MB}MB" for s in SIZES])
@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
def test_big_bodies_are_accepted_again_and_again(
    gateway: ChatgateServer, sink: FakeUpstream, target: Target, route: Route, size: int
) -> None:
    payload = route.build(target, size)
    body = body_of(payload)
    assert len(body) == size
    expected = messages_digest(payload["messages"]) if route.chat else None
    statuses = []
    headers = {"content-type": "application/json"}
    with gateway.client(timeout=60.0) as client:  # one keep-alive connection for all of them
        for _ in range(REPEATS):
            response = client.post(route.path, content=body, headers=headers)
            statuses.append(response.status_code)
            if response.status_code != route.expect:
                break
            if route.chat:
                (upstream,) = received(sink)
                assert upstream["messages_sha256"] == expected  # the whole chat reached the model server
                sink.reset()
    assert statuses == [route.expect] * REPEATS, response.text


@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
def test_a_body_over_the_limit_is_refused_413(
    gateway: ChatgateServer, sink: FakeUpstream, target: Target, route: Route
) -> None:
    body = body_of(route.build(target, TOO_LARGE))
    with gateway.client(timeout=60.0) as client:
        response = client.post(route.path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than the limit of 20971520 bytes" in response.text
    assert received(sink) == []


@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
def test_the_body_limit_is_exact(gateway: ChatgateServer, sink: FakeUpstream, target: Target, route: Route) -> None:
    with gateway.client(timeout=60.0) as client:
        for size, expect in ((LIMIT, route.expect), (LIMIT + 1, 413)):
            body = body_of(route.build(target, size))
            response = client.post(route.path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == expect, (size, response.text)
            sink.reset()
