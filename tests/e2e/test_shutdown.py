"""Graceful shutdown of a real `chatgate serve`: SIGTERM starts a drain (readiness 503, the server
still listening), running chats may finish within CHATGATE_DRAIN_TIMEOUT, the rest are ended the
dialect's way and recorded as 503, and the process exits 0 without a traceback."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]  # the usage rows are read from its file


@dataclass
class Stream:
    """One chat read by a thread: its bytes so far, and how it ended."""

    started: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    received: bytes = b""
    error: Exception | None = None


def stream_chat(server: ChatgateServer, path: str, payload: dict[str, Any], into: Stream) -> Stream:
    try:
        with server.client(timeout=60.0) as client, client.stream("POST", path, json=payload) as response:
            into.status = response.status_code
            for part in response.iter_raw():
                into.received += part
                into.started.set()
    except httpx.HTTPError as exc:
        into.error = exc
    into.started.set()
    return into


def openai_payload(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}


def custom_payload(model_id: str, upstream_name: str) -> dict[str, Any]:
    return {
        "chatSettings": {"model": upstream_name},
        "messages": [{"role": "user", "content": "hi"}],
        "customModelId": model_id,
    }


def held(gate: str) -> dict[str, Any]:
    """A stream that sends its first words, then waits for `gate`, then finishes properly."""
    return {
        "steps": [
            {"role": "assistant"},
            {"delta": "first words"},
            {"wait": gate},
            {"delta": ", and the rest"},
            {"finish": "stop"},
            {"done": True},
        ]
    }


def proc(server: ChatgateServer) -> subprocess.Popen[bytes]:
    assert server.process is not None and server.process.proc is not None
    return server.process.proc


def ready_status(server: ChatgateServer) -> int:
    """GET /readyz on a new connection (the server keeps listening while it drains)."""
    return httpx.get(server.url + "/readyz", trust_env=False, timeout=5.0).status_code


def usage_statuses(server: ChatgateServer) -> dict[uuid.UUID, list[int]]:
    with sqlite3.connect(server.data_dir / "chatgate.db") as db:
        rows = db.execute("SELECT model_id, status FROM chatgate_usage").fetchall()
    statuses: dict[uuid.UUID, list[int]] = {}
    for model_id, status in rows:
        statuses.setdefault(uuid.UUID(model_id), []).append(status)
    return statuses


def register(server: ChatgateServer, fake: FakeUpstream, script: Any) -> tuple[str, str]:
    name = unique_name("m")
    fake.script(name, script)
    return server.add_model(base_url=fake.base_url, model_id=name), name


def test_sigterm_drains_then_ends_what_still_runs(
    make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    drain = 4.0
    server = make_chatgate(drain_timeout=drain, first_byte_timeout=60)
    finishing_gate, never_gate = unique_name("finishing"), unique_name("never")
    finishing_id, _ = register(server, fake, held(finishing_gate))
    cut_v1_id, _ = register(server, fake, held(never_gate))
    cut_custom_id, cut_custom = register(server, fake, held(never_gate))
    waiting_id, waiting = register(server, fake, {"steps": [{"hang_before_headers": True}]})
    assert ready_status(server) == 200

    streams = {key: Stream() for key in ("finishing", "cut_v1", "cut_custom", "waiting")}
    with ThreadPoolExecutor(4) as pool:
        futures: list[Future[Stream]] = [
            pool.submit(
                stream_chat, server, "/v1/chat/completions", openai_payload(finishing_id), streams["finishing"]
            ),
            pool.submit(stream_chat, server, "/v1/chat/completions", openai_payload(cut_v1_id), streams["cut_v1"]),
            pool.submit(
                stream_chat,
                server,
                "/api/chat/custom",
                custom_payload(cut_custom_id, cut_custom),
                streams["cut_custom"],
            ),
            pool.submit(stream_chat, server, "/v1/chat/completions", openai_payload(waiting_id), streams["waiting"]),
        ]
        for key in ("finishing", "cut_v1", "cut_custom"):
            assert streams[key].started.wait(10), key
            assert b"first words" in streams[key].received, key  # the responses began
        fake.wait_for_requests(waiting)

        signalled = time.monotonic()
        proc(server).send_signal(signal.SIGTERM)
        wait_until(lambda: ready_status(server) == 503, timeout=5.0)
        with httpx.Client(base_url=server.url, trust_env=False) as http:
            assert http.get("/healthz").status_code == 200  # alive, only not ready
            assert http.get("/readyz").json() == {"status": "draining"}

        fake.release(finishing_gate)
        for future in futures:
            future.result(timeout=30)
        ended = time.monotonic() - signalled

    code = proc(server).wait(timeout=30)
    assert code == 0
    assert ended >= drain - 0.5  # the unfinished ones were given the drain time

    finished = streams["finishing"]
    assert finished.status == 200 and finished.error is None
    assert b"first words" in finished.received and b", and the rest" in finished.received
    assert finished.received.rstrip().endswith(b"data: [DONE]")

    cut = streams["cut_v1"]
    assert cut.status == 200 and cut.error is None  # the SSE stream ends properly, with an error event
    events = [line for line in cut.received.decode().splitlines() if line.startswith("data: ")]
    assert "first words" in events[1]
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["message"] == "chatgate is shutting down"
    assert "[DONE]" not in cut.received.decode()

    aborted = streams["cut_custom"]
    assert aborted.status == 200 and aborted.received == b"first words"
    assert isinstance(aborted.error, httpx.RemoteProtocolError)  # an unterminated body: the client can tell

    early = streams["waiting"]
    assert early.status == 503 and b"chatgate is shutting down" in early.received

    statuses = usage_statuses(server)
    assert statuses[uuid.UUID(finishing_id)] == [200]
    assert statuses[uuid.UUID(cut_v1_id)] == [503]
    assert statuses[uuid.UUID(cut_custom_id)] == [503]
    assert statuses[uuid.UUID(waiting_id)] == [503]

    log = server.log_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert "drain time is up: ending 3 chat(s) still running" in log


def test_sigterm_with_nothing_running_exits_at_once(make_chatgate: Callable[..., ChatgateServer]) -> None:
    server = make_chatgate()  # the default drain time, 30 s: not waited for when nothing runs
    signalled = time.monotonic()
    proc(server).send_signal(signal.SIGTERM)
    assert proc(server).wait(timeout=10) == 0
    assert time.monotonic() - signalled < 5
    assert "Traceback" not in server.log_text()


def test_a_second_signal_stops_at_once(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate(drain_timeout=60)
    gate = unique_name("never")
    model_id, _ = register(server, fake, held(gate))
    stream = Stream()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream_chat, server, "/v1/chat/completions", openai_payload(model_id), stream)
        assert stream.started.wait(10)
        signalled = time.monotonic()
        proc(server).send_signal(signal.SIGTERM)
        wait_until(lambda: ready_status(server) == 503, timeout=5.0)
        proc(server).send_signal(signal.SIGINT)
        proc(server).wait(timeout=15)
        assert time.monotonic() - signalled < 10  # far less than the drain time
        future.result(timeout=10)
    assert "again: stopping now" in server.log_text()
