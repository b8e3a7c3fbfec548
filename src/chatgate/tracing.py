"""OpenTelemetry traces, optional (`pip install 'chatgate[otel]'`): one span per chat with the
GenAI semantic-convention attributes, exported over OTLP/HTTP.

On when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set at start-up,
the SDK reading every other standard variable itself. Off, nothing is imported and a chat pays one
`is None` test. The client's W3C `traceparent` is the span's parent, and the span's own goes to the
model server, so a trace runs from the front end through chatgate to the model.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from chatgate.api.asgi import Scope
from chatgate.trace import ChatTrace

log = logging.getLogger("chatgate")

_PROPAGATED = (b"traceparent", b"tracestate")


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


class Tracing:
    """The tracer of one process; `start` and `end` bracket one chat."""

    def __init__(self, provider: Any, tracer: Any, propagator: Any) -> None:
        self._provider = provider
        self._tracer = tracer
        self._propagator = propagator

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """A tracer when an OTLP endpoint is configured (and the SDK is not disabled), else None."""
        env = os.environ
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            return None
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is missing: "
                        "install 'chatgate[otel]'; chats are not traced")  # fmt: skip
            return None
        from chatgate import __version__

        resource = Resource.create(
            {SERVICE_NAME: env.get("OTEL_SERVICE_NAME", "chatgate"), "service.version": __version__}
        )
        provider = TracerProvider(resource=resource)
        # Batched in a background thread: a chat only queues its span.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, provider.get_tracer("chatgate", __version__), TraceContextTextMapPropagator())

    def start(self, scope: Scope, trace: ChatTrace) -> None:
        """Open the chat's span (child of the client's `traceparent`) and prepare the headers that
        carry it to the model server."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in _PROPAGATED
        }
        parent = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            "chat",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=time.time_ns() - int((time.perf_counter() - trace.t0) * 1e9),
        )
        outgoing: dict[str, str] = {}
        self._propagator.inject(outgoing, context=set_span_in_context(span))
        # The propagator validates what it extracted; a header line is built only of printable text.
        trace.upstream_headers = "".join(
            f"{name}: {value}\r\n" for name, value in outgoing.items() if _printable(name) and _printable(value)
        ).encode("ascii")
        trace.span = span

    def end(self, trace: ChatTrace) -> None:
        """Name the span, set its attributes, and end it."""
        from opentelemetry.trace import Status, StatusCode

        span = trace.span
        if span is None:
            return
        status = trace.status or (499 if trace.client_gone else 500)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "http.route": trace.endpoint,
            "http.response.status_code": status,
            "chatgate.request_id": trace.request_id,
            "chatgate.client_gone": trace.client_gone,
        }
        if trace.model:
            attributes["gen_ai.request.model"] = trace.model
            span.update_name(f"chat {trace.model}")
        if trace.response_model is not None:
            attributes["gen_ai.response.model"] = trace.response_model
        if trace.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = trace.prompt_tokens
        if trace.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = trace.completion_tokens
        if trace.base_url:
            parts = urlsplit(trace.base_url)
            if parts.hostname:
                attributes["server.address"] = parts.hostname
                attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
        if status >= 500 or trace.error_kind is not None:
            attributes["error.type"] = trace.error_kind or str(status)
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        span.end()

    def shutdown(self) -> None:
        """Export what is queued, then stop (at process shut-down)."""
        self._provider.shutdown()
