"""The gateway's one broad catch: an unexpected exception is a 500 without internals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from chatgate.api import chat_custom
from chatgate.api.asgi import ABORT_EXTENSION
from chatgate.app import Gateway
from chatgate.config import Settings
from chatgate.errors import UpstreamUnreachable
from chatgate.trace import ChatTrace


async def call(app: Gateway, path: str) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return sent[0]["status"], orjson.loads(sent[1]["body"])


def test_unexpected_error_is_500_with_details_only_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    app = Gateway(Settings())

    async def broken(*_args: Any) -> None:
        raise RuntimeError("internal detail 42")

    app._chats["/api/chat/custom"] = (broken, chat_custom.render_error)
    with caplog.at_level(logging.ERROR, logger="chatgate"):
        status, body = asyncio.run(call(app, "/api/chat/custom"))
    assert status == 500
    assert body == {"message": "An unexpected error occurred"}
    assert "internal detail" in caplog.text  # the operator sees it, with the request id
    assert "unexpected error" in caplog.text


@pytest.mark.parametrize("failure", [RuntimeError("bug"), UpstreamUnreachable("gone")], ids=["bug", "chatgate-error"])
def test_a_failure_after_the_response_started_aborts_it(failure: Exception) -> None:
    """Too late for a status: the response is ended through the server's abort (no uvicorn ERROR)."""
    app = Gateway(Settings())
    aborted: list[bool] = []

    async def fails_midway(scope: Any, receive: Any, send: Any, trace: ChatTrace) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        trace.first_byte()
        raise failure

    app._chats["/api/chat/custom"] = (fails_midway, chat_custom.render_error)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/chat/custom",
        "headers": [],
        "extensions": {ABORT_EXTENSION: lambda: aborted.append(True)},
    }
    asyncio.run(app(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert aborted == [True]
