"""Usage accounting through real processes: each chat's row, GET /api/usage and `chatgate usage`."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name, wait_until
from tests.support import openai_shapes as shapes

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]


def register(gateway: ChatgateServer, fake: FakeUpstream, script: Any = None, token: str | None = None) -> str:
    upstream = unique_name("up")
    if script is not None:
        fake.script(upstream, script)
    return gateway.add_model(token, name=unique_name("alias"), base_url=fake.base_url, model_id=upstream)


def usage_rows(gateway: ChatgateServer, token: str | None = None, count: int = 1, **params: str) -> list[Any]:
    """The rows /api/usage answers with for `params`, once there are `count` of them."""

    def fetch() -> tuple[list[Any]] | None:
        with gateway.client(token) as http:
            response = http.get("/api/usage", params=params)
        assert response.status_code == 200, response.text
        rows: list[Any] = response.json()["data"]
        return (rows,) if len(rows) >= count else None

    return wait_until(fetch, timeout=5.0)[0]  # type: ignore[no-any-return]


def chat(
    gateway: ChatgateServer, model: str, *, stream: bool, token: str | None = None, **extra: Any
) -> httpx.Response:
    with gateway.client(token) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "stream": stream, **extra}
        )
        response.read()
        return response


def test_streamed_chat_row_matches_what_the_upstream_reported(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    counts = shapes.usage(prompt_tokens=23, completion_tokens=3)
    script = {"steps": [{"delta": "a"}, {"delta": "b"}, {"finish": "stop"}, {"usage": counts}, {"done": True}]}
    model_id = register(gateway, fake, script)
    before = datetime.now(UTC)
    response = chat(gateway, model_id, stream=True)
    assert response.status_code == 200
    (row,) = usage_rows(gateway, model=model_id)
    assert row["request_id"] == response.headers["x-request-id"]
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["model_id"] == model_id
    assert row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (23, 3)
    assert row["bytes_out"] == len(response.content)
    assert row["client_gone"] is False
    assert row["error"] is None
    assert 0 < row["ttfb"] <= row["duration"] < 10
    started = datetime.fromisoformat(row["started_at"])
    assert before - timedelta(seconds=1) <= started <= datetime.now(UTC)


def test_non_streamed_chat_row(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id = register(gateway, fake, scripts.body(200, shapes.completion("m", "hi", shapes.usage(5, 9))))
    response = chat(gateway, model_id, stream=False)
    (row,) = usage_rows(gateway, model=model_id)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 5, 9)
    assert row["bytes_out"] == len(response.content)


def test_custom_route_is_counted_too(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id = register(gateway, fake)  # the fake answers include_usage with its default counts
    body = {"chatSettings": {"temperature": 0}, "messages": MESSAGES, "customModelId": model_id}
    with gateway.client() as http:
        response = http.post("/api/chat/custom", json=body)
    assert response.text == shapes.DEFAULT_REPLY  # the usage chunk changes nothing in the answer
    (row,) = usage_rows(gateway, model=model_id)
    assert row["endpoint"] == "/api/chat/custom"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, len(shapes.DEFAULT_DELTAS))
    assert row["bytes_out"] == len(shapes.DEFAULT_REPLY)


def test_tokens_are_unknown_when_the_server_refuses_stream_options(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    refusal = scripts.error(400, "Unrecognized request argument supplied: stream_options")
    model_id = register(gateway, fake, [refusal, scripts.stream("ok")])
    assert chat(gateway, model_id, stream=True).status_code == 200
    (row,) = usage_rows(gateway, model=model_id)
    assert row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (None, None)


def test_failed_chat_row(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id = register(gateway, fake, scripts.error(500, "model exploded"))
    assert chat(gateway, model_id, stream=True).status_code == 500
    (row,) = usage_rows(gateway, model=model_id)
    assert (row["status"], row["error"], row["ttfb"]) == (500, "model exploded", None)


def test_client_that_went_away(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    model_id = register(gateway, fake, {"steps": [{"delta": "thinking"}, {"hang": True}]})
    payload = {"model": model_id, "messages": MESSAGES, "stream": True}
    with gateway.client() as http, http.stream("POST", "/v1/chat/completions", json=payload) as response:
        next(response.iter_raw())
    (row,) = usage_rows(gateway, model=model_id)
    assert (row["client_gone"], row["status"]) == (True, 499)


def test_users_see_their_own_rows_and_admins_all(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    token = gateway.new_user()
    model_id = register(gateway, fake, token=token)
    chat(gateway, model_id, stream=False, token=token)
    chat(gateway, model_id, stream=False)  # the admin uses the user's model too
    everyone = usage_rows(gateway, count=2, model=model_id)
    assert len({row["user_id"] for row in everyone}) == 2
    (mine,) = usage_rows(gateway, token, model=model_id)
    assert mine in everyone
    assert {row["user_id"] for row in usage_rows(gateway, token)} == {mine["user_id"]}


def test_filter_by_time_range_and_model_name(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = unique_name("alias")
    model_id = gateway.add_model(name=name, base_url=fake.base_url, model_id=unique_name("up"))
    chat(gateway, name, stream=False)
    (row,) = usage_rows(gateway, model=name)
    assert row["model_id"] == model_id
    assert row["model_name"] == name
    started = datetime.fromisoformat(row["started_at"])
    window = {"model": model_id}
    assert usage_rows(gateway, **window, since=(started - timedelta(seconds=1)).isoformat()) == [row]
    assert usage_rows(gateway, count=0, **window, since=(started + timedelta(seconds=1)).isoformat()) == []
    assert usage_rows(gateway, count=0, **window, until=started.isoformat()) == []
    naive_utc = (started + timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    assert usage_rows(gateway, **window, until=naive_utc) == [row]


def test_bad_time_is_a_422(gateway: ChatgateServer) -> None:
    with gateway.client() as http:
        response = http.get("/api/usage", params={"since": "yesterday-ish"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.since"


def test_usage_command_prints_a_table_per_model_and_day(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = unique_name("alias")
    model_id = gateway.add_model(name=name, base_url=fake.base_url, model_id=unique_name("up"))
    for _ in range(3):
        chat(gateway, name, stream=False)
    usage_rows(gateway, count=3, model=model_id)
    result = gateway.cli("usage", "--model", name)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if name in line]
    cells = [cell.strip() for cell in line.strip("│ ").split("│")]
    today = datetime.now(UTC).date().isoformat()
    # model, day, requests, errors, prompt tokens, completion tokens, TTFB p50, TTFB p95
    assert cells[:6] == [name, today, "3", "0", "21", str(3 * len(shapes.DEFAULT_DELTAS))]
    assert all(cell.endswith(" ms") for cell in cells[6:8])


@pytest.mark.backends("sqlite")
def test_a_failing_usage_store_does_not_fail_chats(
    make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_chatgate()
    model_id = server.add_model(base_url=fake.base_url, model_id=unique_name("up"))
    with sqlite3.connect(server.data_dir / "chatgate.db") as db:
        db.execute("DROP TABLE chatgate_usage")
    for stream in (True, False):
        response = chat(server, model_id, stream=stream)
        assert response.status_code == 200
    wait_until(lambda: re.search(r"usage: \d row\(s\) not recorded", server.log_text()), timeout=5.0)
    assert response.json()["choices"][0]["message"]["content"] == shapes.DEFAULT_REPLY
    assert "Traceback" not in server.log_text()
