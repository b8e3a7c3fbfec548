"""Several instances: two chatgate processes on one PostgreSQL database and one Redis behave as
one gateway (limits in total, model changes everywhere within a second, one usage table)."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, services, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis, pytest.mark.backends("postgresql")]

Pair = tuple[ChatgateServer, ChatgateServer]


@pytest.fixture
def make_pair(make_chatgate: Callable[..., ChatgateServer]) -> Callable[..., Pair]:
    """Two instances on one fresh database and a Redis namespace of their own; B uses A's admin."""
    services.require("Redis", services.redis_problem())

    def make(**env: object) -> Pair:
        shared = {
            # Every instance must hold the same key to read the API keys the others sealed.
            "secret_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "redis_url": services.REDIS_URL,
            "redis_prefix": f"chatgate-test:{uuid.uuid4().hex[:8]}:",
            # A cached model would outlive this test: only the pub/sub can make B forget in time.
            "model_cache_ttl": 600,
            **env,
        }
        a = make_chatgate(**shared)
        b = make_chatgate(database_url=a.env["CHATGATE_DATABASE_URL"], **shared)
        assert b.port != a.port
        return a, b

    return make


def body(model: str, name: str) -> dict[str, Any]:
    return {"chatSettings": {"model": name}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}


def chat(server: ChatgateServer, token: str, model: str, name: str) -> httpx.Response:
    with server.client(token) as client:
        return client.post("/api/chat/custom", json=body(model, name))


def test_a_users_rate_limit_holds_across_both_instances_in_total(
    make_pair: Callable[..., Pair], fake: FakeUpstream
) -> None:
    a, b = make_pair(rate_limit_per_minute=4)
    token = a.admin_token  # nothing has counted against the admin yet
    statuses = []
    for server in (a, b, a, b, a, b):
        with server.client(token) as client:
            response = client.get("/api/models")
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
    assert statuses == [200, 200, 200, 200, 429, 429]
    # Another user is not affected.
    with b.client(a.new_user()) as client:
        assert client.get("/api/models").status_code == 200


def test_concurrent_stream_cap_holds_across_both_instances(make_pair: Callable[..., Pair], fake: FakeUpstream) -> None:
    a, b = make_pair(max_concurrent_streams=1)
    name, gate = unique_name("m"), unique_name("gate")
    fake.script(name, {"steps": [{"delta": "held"}, {"wait": gate}, {"done": True}]})
    model = a.add_model(base_url=fake.base_url, model_id=name)
    token = a.admin_token
    with a.client() as client, client.stream("POST", "/api/chat/custom", json=body(model, name)) as held:
        assert held.status_code == 200
        chunks = held.iter_raw()  # kept: a dropped iterator closes the response
        assert next(chunks) == b"held"
        refused = chat(b, token, model, name)
        assert refused.status_code == 429
        assert "concurrent streams" in refused.json()["message"]
        fake.release(gate)
        assert b"".join(chunks) == b""
    fake.script(name, scripts.stream("free again"))
    assert wait_until(lambda: (r := chat(b, token, model, name)).status_code == 200 and r).text == "free again"


def test_a_model_deleted_on_one_instance_is_refused_by_the_other_within_a_second(
    make_pair: Callable[..., Pair], fake: FakeUpstream
) -> None:
    a, b = make_pair()
    token = a.admin_token
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = a.add_model(base_url=fake.base_url, model_id=name)
    assert chat(b, token, model, name).status_code == 200  # B has it cached now

    with a.client() as client:
        assert client.delete(f"/api/models/{model}").status_code == 204
    deleted = time.monotonic()
    with b.client(token) as client:
        while (status := client.post("/api/chat/custom", json=body(model, name)).status_code) == 200:
            assert time.monotonic() - deleted < 1.0, "instance B still serves the deleted model"
            time.sleep(0.02)
    assert status == 404


def test_an_update_on_one_instance_reaches_the_other_within_a_second(
    make_pair: Callable[..., Pair], fake: FakeUpstream
) -> None:
    a, b = make_pair()
    old, new = unique_name("old"), unique_name("new")
    fake.script(old, scripts.stream("old"))
    fake.script(new, scripts.stream("new"))
    model = a.add_model(base_url=fake.base_url, model_id=old)
    chat_b = {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}
    with b.client(a.admin_token) as client:
        assert client.post("/api/chat/custom", json=chat_b).text == "old"
        with a.client() as writer:
            assert writer.patch(f"/api/models/{model}", json={"model_id": new}).status_code == 200
        updated = time.monotonic()
        while client.post("/api/chat/custom", json=chat_b).text != "new":
            assert time.monotonic() - updated < 1.0, "instance B still uses the old model id"
            time.sleep(0.02)


def test_usage_from_both_instances_lands_in_one_table(make_pair: Callable[..., Pair], fake: FakeUpstream) -> None:
    a, b = make_pair()
    token = a.admin_token
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = a.add_model(base_url=fake.base_url, model_id=name)
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda s=s: statuses.append(chat(s, token, model, name).status_code))
        for s in (a, b, a, b)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4
    url = a.env["CHATGATE_DATABASE_URL"]

    def rows() -> list[Any]:
        query = "SELECT status, user_id FROM chatgate_usage WHERE model_id = $1"
        found = services.sql(url, query, uuid.UUID(model))
        return found if len(found) == 4 else []

    assert {(r["status"], str(r["user_id"])) for r in wait_until(rows, timeout=10)} == {(200, admin_id(a))}


def admin_id(server: ChatgateServer) -> str:
    (row,) = services.sql(server.env["CHATGATE_DATABASE_URL"], "SELECT id FROM chatgate_users WHERE name = 'admin'")
    return str(row["id"])


def test_a_model_removed_with_the_cli_is_refused_by_running_instances_within_a_second(
    make_pair: Callable[..., Pair], fake: FakeUpstream
) -> None:
    a, b = make_pair()
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = a.add_model(base_url=fake.base_url, model_id=name)
    assert chat(b, a.admin_token, model, name).status_code == 200
    removed = a.cli("models", "remove", model)
    assert removed.returncode == 0, removed.stderr
    done = time.monotonic()
    while chat(b, a.admin_token, model, name).status_code == 200:
        assert time.monotonic() - done < 1.0, "instance B still serves the removed model"
        time.sleep(0.02)
