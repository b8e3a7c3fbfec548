"""Failover through real processes: client → chatgate → fake upstreams that fail in each way a
model server does (refused port, hang before the head, stall before the first token, 429 with
Retry-After, 503, cut mid-stream), and the fallbacks that answer instead. What each upstream
received comes from the fake's own request log; what the caller got, from the bytes on the wire;
what was recorded, from /api/usage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import Databases, _server
from tests.support import ChatgateServer, FakeUpstream, refused_base_url, scripts, unique_name, wait_until

pytestmark = pytest.mark.e2e

FAILOVER_ENV: dict[str, object] = {
    "first_byte_timeout": 1,
    "first_token_timeout": 1,
    "idle_timeout": 2,
    "connect_timeout": 1,
    "retry_attempts": 1,
    "retry_backoff": 0.01,
    "retry_after_cap": 2,
    "breaker_threshold": 0,  # off here: these tests fail the same models on purpose (test_breaker.py)
    "log_level": "info",
}


@pytest.fixture(scope="module")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """One chatgate per backend for this module, with short timeouts and fast retries."""
    databases = Databases(backend)
    gateway = _server(tmp_path_factory.mktemp(f"failover-{backend}"), databases, dict(FAILOVER_ENV))
    try:
        yield gateway.start()
    finally:
        gateway.stop()
        databases.drop_all()


class Upstream:
    """A model registered in chatgate whose fake upstream follows a script (or a dead URL)."""

    def __init__(
        self,
        server: ChatgateServer,
        fake: FakeUpstream,
        script: Any = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        **fields: Any,
    ) -> None:
        self.name = unique_name("up")
        if script is not None:
            fake.script(self.name, script)
        self.fake = fake
        self.id = server.add_model(token, base_url=base_url or fake.base_url, model_id=self.name, **fields)

    def requests(self) -> list[Any]:
        return self.fake.requests(model=self.name)


def answering(server: ChatgateServer, fake: FakeUpstream, text: str, **fields: Any) -> Upstream:
    return Upstream(server, fake, scripts.stream(text), **fields)


def set_routes(server: ChatgateServer, model: str, token: str | None = None, **routes: Any) -> httpx.Response:
    with server.client(token) as client:
        return client.patch(f"/api/models/{model}", json=routes)


def custom(server: ChatgateServer, model: str, token: str | None = None) -> httpx.Response:
    payload = {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}
    with server.client(token) as client:
        return client.post("/api/chat/custom", json=payload)


def usage_row(server: ChatgateServer, model: str, request_id: str, token: str | None = None) -> dict[str, Any]:
    def fetch() -> dict[str, Any] | None:
        with server.client(token) as client:
            rows = client.get("/api/usage", params={"model": model}).json()["data"]
        return next((row for row in rows if row["request_id"] == request_id), None)

    row: dict[str, Any] = wait_until(fetch)
    return row


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


MODES = [
    "refuse",
    "reset_before_head",
    "hang_before_head",
    "stall_before_first_token",
    "status_429",
    "status_503",
    "cut_before_text",
    "status_500",
]
# Failures retried once on the same model before the fallback; the others fail over at once.
# A connection lost before the first text is a reset, retried alike.
RETRIED = {"refuse", "reset_before_head", "hang_before_head", "stall_before_first_token", "status_429", "status_503"}
RETRIED.add("cut_before_text")


def failing(server: ChatgateServer, fake: FakeUpstream, mode: str) -> Upstream:
    if mode == "refuse":
        return Upstream(server, fake, base_url=refused_base_url())
    return Upstream(server, fake, scripts.failure(mode))


@pytest.mark.parametrize("mode", MODES)
def test_custom_route_fails_over_to_the_fallback(server: ChatgateServer, fake: FakeUpstream, mode: str) -> None:
    primary = failing(server, fake, mode)
    fallback = answering(server, fake, "answer from the fallback")
    assert set_routes(server, primary.id, fallbacks=[fallback.id]).status_code == 200

    response = custom(server, primary.id)

    assert response.status_code == 200, response.text
    assert response.text == "answer from the fallback"
    assert response.headers["x-chatgate-model"] == fallback.id
    tries = 2 if mode in RETRIED else 1
    if mode in ("hang_before_head", "reset_before_head"):
        # The pool itself re-sends once on a fresh connection when a reused keep-alive one stays
        # silent or is reset before the head (http11.Pool.request), as a stale keep-alive connection
        # would be: that is the transport's, not an attempt of failover's.
        assert len(primary.requests()) in (tries, tries + 1)
    elif mode != "refuse":
        assert len(primary.requests()) == tries
    assert len(fallback.requests()) == 1
    row = usage_row(server, primary.id, response.headers["x-request-id"])
    assert row["status"] == 200
    assert row["attempts"] == tries + 1
    assert row["answered_model_id"] == fallback.id
    assert row["model_id"] == primary.id


@pytest.mark.parametrize("mode", ["hang_before_head", "stall_before_first_token", "status_503", "cut_before_text"])
def test_v1_stream_fails_over_and_the_client_sees_one_answer(
    server: ChatgateServer, fake: FakeUpstream, mode: str
) -> None:
    primary = failing(server, fake, mode)
    fallback = answering(server, fake, "from the fallback")
    assert set_routes(server, primary.id, fallbacks=[fallback.id]).status_code == 200

    with server.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": primary.id, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )

    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    # Every event is the fallback's: the primary's role-only first event was held back, not sent.
    assert {chunk["model"] for chunk in chunks} == {fallback.name}
    assert [c["choices"][0]["delta"].get("role") for c in chunks].count("assistant") == 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "from the fallback"
    assert response.headers["x-chatgate-model"] == fallback.id


def test_v1_non_streamed_answer_fails_over(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = failing(server, fake, "status_503")
    fallback = Upstream(server, fake)  # the fake's default answer
    assert set_routes(server, primary.id, fallbacks=[fallback.id]).status_code == 200
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={"model": primary.id, "messages": []})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == fallback.name
    assert len(primary.requests()) == 2


def test_a_transient_failure_is_retried_on_the_same_model(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = Upstream(server, fake, [scripts.failure("status_503"), scripts.stream("second try")])
    fallback = answering(server, fake, "never")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    response = custom(server, primary.id)
    assert response.text == "second try"
    assert response.headers["x-chatgate-model"] == primary.id
    assert len(primary.requests()) == 2
    assert fallback.requests() == []
    row = usage_row(server, primary.id, response.headers["x-request-id"])
    assert (row["attempts"], row["answered_model_id"]) == (2, primary.id)


def test_a_model_without_fallbacks_is_retried_then_its_error_answered(
    server: ChatgateServer, fake: FakeUpstream
) -> None:
    primary = failing(server, fake, "status_503")
    response = custom(server, primary.id)
    assert response.status_code == 503
    assert response.json() == {"message": "503 The server is overloaded"}
    assert len(primary.requests()) == 2
    row = usage_row(server, primary.id, response.headers["x-request-id"])
    assert (row["status"], row["attempts"], row["answered_model_id"]) == (503, 2, None)


def test_retry_after_is_waited_for_when_short(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = Upstream(server, fake, [scripts.failure("status_429", retry_after="1"), scripts.stream("waited")])
    started = time.monotonic()
    response = custom(server, primary.id)
    elapsed = time.monotonic() - started
    assert response.text == "waited"
    first, second = primary.requests()
    assert second["time"] - first["time"] >= 0.95
    assert elapsed < 5


def test_a_retry_after_beyond_the_cap_goes_to_the_fallback_at_once(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = failing(server, fake, "status_429")
    fake.script(primary.name, scripts.failure("status_429", retry_after="120"))
    fallback = answering(server, fake, "no waiting")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    started = time.monotonic()
    response = custom(server, primary.id)
    assert response.text == "no waiting"
    assert time.monotonic() - started < 2
    assert len(primary.requests()) == 1


def test_a_retry_after_beyond_the_cap_without_fallback_passes_it_on(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = Upstream(server, fake, scripts.failure("status_429", retry_after="120"))
    response = custom(server, primary.id)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "120"
    assert len(primary.requests()) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_a_callers_fault_is_answered_at_once(server: ChatgateServer, fake: FakeUpstream, status: int) -> None:
    primary = Upstream(server, fake, scripts.error(status, "your request is wrong"))
    fallback = answering(server, fake, "never")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    response = custom(server, primary.id)
    assert response.status_code == status
    assert len(primary.requests()) == 1
    assert fallback.requests() == []


def test_nothing_is_retried_once_text_reached_the_client(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = Upstream(server, fake, scripts.cut_after("partial "))
    fallback = answering(server, fake, "never")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    received = b""
    with (
        server.client() as client,
        client.stream(
            "POST",
            "/api/chat/custom",
            json={"chatSettings": {}, "messages": [], "customModelId": primary.id},
        ) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_raw():
                received += chunk
    assert received == b"partial "  # the answer is cut, never continued by another model
    assert len(primary.requests()) == 1
    assert fallback.requests() == []


def test_fallbacks_are_tried_in_order(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = failing(server, fake, "status_500")
    second = failing(server, fake, "status_500")
    third = answering(server, fake, "third")
    set_routes(server, primary.id, fallbacks=[second.id, third.id])
    response = custom(server, primary.id)
    assert response.text == "third"
    first_seen = [primary.requests()[0]["time"], second.requests()[0]["time"], third.requests()[0]["time"]]
    assert first_seen == sorted(first_seen)
    row = usage_row(server, primary.id, response.headers["x-request-id"])
    assert (row["attempts"], row["answered_model_id"]) == (3, third.id)


def test_when_every_model_fails_the_error_names_no_fallback_detail(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = failing(server, fake, "status_500")
    secret_url = refused_base_url()
    fallback = Upstream(server, fake, base_url=secret_url, api_key="sk-fallback-secret-0123456789")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    response = custom(server, primary.id)
    assert response.status_code == 502
    message = response.json()["message"]
    assert "could not be reached" in message
    port = secret_url.rsplit(":", 1)[1].split("/")[0]
    assert port not in message and "127.0.0.1" not in message and "sk-fallback" not in message


def test_the_deadline_bounds_the_whole_chain(make_chatgate: Any, fake: FakeUpstream) -> None:
    gateway = make_chatgate(**{**FAILOVER_ENV, "failover_deadline": 1.5, "retry_attempts": 3})
    models = [failing(gateway, fake, "hang_before_head") for _ in range(4)]
    set_routes(gateway, models[0].id, fallbacks=[m.id for m in models[1:]])
    started = time.monotonic()
    response = custom(gateway, models[0].id)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    # Without the deadline: 4 models x 4 tries x 1 s each.
    assert elapsed < 3.0
    assert sum(len(m.requests()) for m in models) <= 3


# ----- who may name what ---------------------------------------------------------------------


def test_fallbacks_are_shown_to_the_owner_and_set_through_the_api(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary, a, b = (answering(server, fake, "x") for _ in range(3))
    response = set_routes(server, primary.id, fallbacks=[a.id, b.id], members=[{"id": primary.id, "weight": 3}])
    assert response.status_code == 200, response.text
    assert response.json()["fallbacks"] == [a.id, b.id]
    with server.client() as client:
        shown = client.get(f"/api/models/{primary.id}").json()
        schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert shown["fallbacks"] == [a.id, b.id]
    assert shown["members"] == [{"id": primary.id, "weight": 3}]
    assert "fallbacks" in schema["ModelUpdate"]["properties"]
    assert set_routes(server, primary.id, fallbacks=[]).json()["fallbacks"] == []


@pytest.mark.parametrize(
    "routes",
    [
        {"fallbacks": ["SELF"]},
        {"fallbacks": ["A", "A"]},
        {"fallbacks": ["not-a-uuid"]},
        {"members": [{"id": "A", "weight": 0}]},
    ],
)
def test_bad_routes_are_refused_in_plain_words(
    server: ChatgateServer, fake: FakeUpstream, routes: dict[str, Any]
) -> None:
    primary, a = answering(server, fake, "x"), answering(server, fake, "y")
    given = json.loads(json.dumps(routes).replace("SELF", primary.id).replace('"A"', f'"{a.id}"'))
    response = set_routes(server, primary.id, **given)
    assert response.status_code in (400, 422)
    assert "message" in response.json() or "error" in response.json()


def test_only_models_the_owner_may_use_can_be_named(server: ChatgateServer, fake: FakeUpstream) -> None:
    alice, bob = server.new_user(), server.new_user()
    alices = answering(server, fake, "a", token=alice)
    bobs_private = answering(server, fake, "b", token=bob)
    bobs_public = answering(server, fake, "c", token=bob, sharing="public")
    refused = set_routes(server, alices.id, alice, fallbacks=[bobs_private.id])
    missing = set_routes(server, alices.id, alice, fallbacks=["00000000-0000-0000-0000-000000000000"])
    assert refused.status_code == missing.status_code == 400
    # A private model of someone else is refused in the words used for one that does not exist.
    assert refused.json()["message"].replace(bobs_private.id, "X") == missing.json()["message"].replace(
        "00000000-0000-0000-0000-000000000000", "X"
    )
    assert set_routes(server, alices.id, alice, fallbacks=[bobs_public.id]).status_code == 200
    # Nor may Bob name fallbacks on Alice's model.
    assert set_routes(server, alices.id, bob, fallbacks=[bobs_public.id]).status_code == 404


def test_a_caller_of_a_shared_model_never_learns_its_fallbacks(server: ChatgateServer, fake: FakeUpstream) -> None:
    owner, caller = server.new_user(), server.new_user()
    shared = Upstream(server, fake, scripts.failure("status_503"), token=owner, sharing="public")
    hidden = Upstream(
        server, fake, scripts.stream("from the owner's private model"), token=owner, api_key="sk-private-9876543210"
    )
    assert set_routes(server, shared.id, owner, fallbacks=[hidden.id]).status_code == 200

    response = custom(server, shared.id, caller)
    assert response.text == "from the owner's private model"
    assert response.headers["x-chatgate-model"] == "fallback-1"  # not the private model's id
    with server.client(caller) as client:
        shown = client.get(f"/api/models/{shared.id}").json()
        listed = [m for m in client.get("/api/models").json()["data"] if m["id"] == shared.id]
        direct = client.post("/api/chat/custom", json={"chatSettings": {}, "messages": [], "customModelId": hidden.id})
    row = usage_row(server, shared.id, response.headers["x-request-id"], caller)
    assert row["answered_model_id"] == "hidden"  # the owner's private model's id, kept from the caller
    assert "fallbacks" not in shown and "members" not in shown
    assert "fallbacks" not in listed[0]
    assert direct.status_code == 404  # the fallback is not the caller's to use directly
    assert hidden.id not in response.text and "sk-private" not in json.dumps(dict(response.headers))

    # When both fail, the caller's error says nothing of the hidden model's server or key.
    fake.script(hidden.name, scripts.error(500, "upstream at http://10.0.0.7:8000 says: key sk-private-9876543210"))
    failed = custom(server, shared.id, caller)
    assert failed.status_code == 500
    assert "10.0.0.7" not in failed.text and "sk-private" not in failed.text
    with server.client(caller) as client:
        v1 = client.post("/v1/chat/completions", json={"model": shared.id, "messages": []})
    assert "10.0.0.7" not in v1.text and "sk-private" not in v1.text


def test_deleting_a_fallback_removes_it(server: ChatgateServer, fake: FakeUpstream) -> None:
    primary = failing(server, fake, "status_500")
    fallback = answering(server, fake, "gone soon")
    set_routes(server, primary.id, fallbacks=[fallback.id])
    assert custom(server, primary.id).text == "gone soon"
    with server.client() as client:
        assert client.delete(f"/api/models/{fallback.id}").status_code == 204
        assert client.get(f"/api/models/{primary.id}").json()["fallbacks"] == []
    assert custom(server, primary.id).status_code == 500


def test_the_cli_sets_fallbacks_and_members(server: ChatgateServer, fake: FakeUpstream, tmp_path: Path) -> None:
    primary, a, b = (answering(server, fake, "x") for _ in range(3))
    done = server.cli("models", "update", primary.id, "--fallbacks", f"{a.id},{b.id}", "--members", f"{a.id}:3")
    assert done.returncode == 0, done.stderr
    assert f"{a.id}, {b.id}" in done.stdout and f"{a.id}:3" in done.stdout  # read as a person reads them
    with server.client() as client:
        shown = client.get(f"/api/models/{primary.id}").json()
    assert shown["fallbacks"] == [a.id, b.id]
    assert shown["members"] == [{"id": a.id, "weight": 3}]
    bad = server.cli("models", "update", primary.id, "--fallbacks", "nope")
    assert bad.returncode == 2
    assert "'nope' is not a model id" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
