"""A stream cut after its first byte is aborted on purpose: the client can tell, and the log has
chatgate's one WARNING with the request id, not uvicorn's ERROR about an unfinished response."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, unique_name, wait_until

pytestmark = pytest.mark.e2e

UVICORN_ERROR = "ASGI callable returned without completing response"


def usage_row(gateway: ChatgateServer, model_id: str) -> dict[str, Any]:
    """The chat's usage row, once recorded (after the request's task has returned)."""

    def fetch() -> dict[str, Any] | None:
        with gateway.client() as http:
            rows: list[dict[str, Any]] = http.get("/api/usage", params={"model": model_id}).json()["data"]
        return rows[0] if rows else None

    row: dict[str, Any] = wait_until(fetch, timeout=10.0)
    return row


def test_a_cut_custom_stream_is_aborted_with_one_warning(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = unique_name("m")
    fake.script(name, {"steps": [{"role": "assistant"}, {"delta": "Hello"}, {"delta": ", wor"}, {"cut": True}]})
    model_id = gateway.add_model(base_url=fake.base_url, model_id=name)
    log_start = len(gateway.log_text())
    payload = {
        "chatSettings": {"model": name},
        "messages": [{"role": "user", "content": "hi"}],
        "customModelId": model_id,
    }
    received = b""
    with gateway.client() as client, client.stream("POST", "/api/chat/custom", json=payload) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends
            for part in response.iter_raw():
                received += part
    assert received == b"Hello, wor"
    row = usage_row(gateway, model_id)
    assert row["status"] == 502
    log = gateway.log_text()[log_start:]
    warnings = [line for line in log.splitlines() if f"request {row['request_id']}: stream aborted" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], log
    assert UVICORN_ERROR not in log
    assert "Traceback" not in log
