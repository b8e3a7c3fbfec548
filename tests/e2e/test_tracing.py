"""OpenTelemetry traces: chatgate (with the otel extra) exports one span per chat to a real
OTLP/HTTP receiver run by the test, which decodes the protobuf; the client's traceparent is the
span's parent and the span's own goes to the model server."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from tests.support import ChatgateServer, FakeUpstream, unique_name, wait_until

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Span] = []
        self.paths: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        self.server.paths.append(self.path)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.server.spans.extend(scope_spans.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def attributes(span: Span) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        found[kv.key] = getattr(kv.value, kind) if kind else None
    return found


def test_one_span_per_chat_with_genai_attributes(tmp_path: Path, receiver: Receiver, fake: FakeUpstream) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with ChatgateServer(tmp_path / "chatgate", extra_env=env) as server:
        ok, failing = unique_name("m"), unique_name("m")
        # The server answers with a dated name, as OpenAI does for an alias.
        fake.script(
            ok, {"answer_model": f"{ok}-2026-12-02", "steps": [{"delta": "Hi"}, {"usage": True}, {"done": True}]}
        )
        fake.script(failing, {"status": 500, "steps": [{"body": {"error": {"message": "boom"}}}]})
        ok_id = server.add_model(base_url=fake.base_url, model_id=ok)
        failing_id = server.add_model(base_url=fake.base_url, model_id=failing)
        with server.client() as client:
            traced = client.post(
                "/v1/chat/completions",
                json={"model": ok_id, "messages": [{"role": "user", "content": "hi"}], "stream": True},
                headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
            )
            assert traced.status_code == 200
            payload = {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": failing_id}
            assert client.post("/api/chat/custom", json=payload).status_code == 500
        spans = wait_until(lambda: len(receiver.spans) >= 2 and receiver.spans, timeout=10)
    assert receiver.paths == ["/v1/traces"] * len(receiver.paths)
    by_name = {span.name: span for span in spans}
    assert set(by_name) == {f"chat {ok}", f"chat {failing}"}

    span = by_name[f"chat {ok}"]
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == CLIENT_SPAN
    assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert span.end_time_unix_nano > span.start_time_unix_nano
    found = attributes(span)
    assert {key: found[key] for key in ("gen_ai.operation.name", "gen_ai.request.model", "server.address")} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": ok,
        "server.address": "127.0.0.1",
    }
    assert found["gen_ai.response.model"] == f"{ok}-2026-12-02"
    assert (found["gen_ai.usage.input_tokens"], found["gen_ai.usage.output_tokens"]) == (7, 5)
    assert found["http.response.status_code"] == 200 and "error.type" not in found
    # The model server got the span's own context: same trace, chatgate's span as parent.
    (request,) = fake.requests(model=ok)
    assert request["headers"]["traceparent"] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"

    failed = by_name[f"chat {failing}"]
    assert failed.trace_id.hex() != TRACE_ID and not failed.parent_span_id  # a root: no traceparent came
    assert attributes(failed)["error.type"] == "status"
    assert failed.status.code == Status.StatusCode.STATUS_CODE_ERROR
