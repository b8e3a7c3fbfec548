"""Redis away: chats keep working (limits fail open), with a warning in the log and a metric."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.support import ChatgateServer, FakeUpstream, free_port, scripts, unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.backends("sqlite")]


def test_chats_work_without_redis_and_say_so(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        rate_limit_per_minute=1,
        max_concurrent_streams=1,
    )
    name = unique_name("m")
    fake.script(name, scripts.stream("still here"))
    model = server.add_model(base_url=fake.base_url, model_id=name)
    body = {"chatSettings": {"model": name}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}
    with server.client() as client:
        for _ in range(3):  # over the limit of 1 a minute: admitted, since nobody can count
            response = client.post("/api/chat/custom", json=body)
            assert response.status_code == 200
            assert response.text == "still here"
        exposition = client.get("/metrics").text
    assert "Redis unavailable" in server.log_text()
    (fail_open,) = [line for line in exposition.splitlines() if line.startswith("chatgate_limits_fail_open_total ")]
    assert float(fail_open.split()[1]) >= 3


def test_metrics_are_for_admins(chatgate_server: ChatgateServer) -> None:
    with chatgate_server.client(chatgate_server.new_user()) as client:
        assert client.get("/metrics").status_code == 404
    with chatgate_server.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "chatgate_redis_errors_total" in response.text or "chatgate_limits_fail_open_total" in response.text
