"""The metrics of one process, in-process: bounded model labels, failure kinds, what one chat adds."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatgate.errors import (
    BadRequest,
    ChatgateError,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgate.metrics import Metrics, failure_kind
from chatgate.trace import ChatTrace


def series(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def finished(model: str, status: int = 200) -> ChatTrace:
    trace = ChatTrace(endpoint="/api/chat/custom", model=model, status=status)
    trace.finish()
    return trace


def test_ten_thousand_models_make_a_bounded_number_of_series() -> None:
    metrics = Metrics(max_models=5)
    for index in range(10_000):
        metrics.observe(finished(f"user-model-{index}"))
    requests = series(metrics, "chatgate_requests_total")
    assert len(requests) == 6  # five models by name, the rest as one `other`
    assert requests[frozenset({("route", "/api/chat/custom"), ("model", "other"), ("status_class", "2xx")})] == 9_995
    assert len(series(metrics, "gen_ai_client_operation_duration_seconds_count")) == 6
    # A model seen before the cap keeps its own series.
    metrics.observe(finished("user-model-3"))
    assert requests != series(metrics, "chatgate_requests_total")


def test_a_chat_without_a_model_is_none_and_a_client_that_left_is_4xx() -> None:
    metrics = Metrics()
    gone = finished("")
    gone.status, gone.client_gone = 0, True
    metrics.observe(gone)
    (labels,) = series(metrics, "chatgate_requests_total")
    assert dict(labels) == {"route": "/api/chat/custom", "model": "none", "status_class": "4xx"}
    assert series(metrics, "chatgate_client_disconnects_total") == {frozenset({("route", "/api/chat/custom")}): 1}


@pytest.mark.parametrize(
    ("exc", "answered", "kind"),
    [
        (UpstreamUnreachable("refused"), False, "connect"),
        (UpstreamUnreachable("reset mid-stream"), True, "cut"),
        (UpstreamTimeout("slow"), False, "timeout"),
        (UpstreamStatus(500, "boom"), True, "status"),
        (UpstreamIncomplete("no [DONE]"), True, "cut"),
        (UpstreamProtocolError("gzip"), True, "protocol"),
        (BadRequest("no"), False, None),
    ],
)
def test_failure_kinds(exc: ChatgateError, answered: bool, kind: str | None) -> None:
    assert failure_kind(exc, answered=answered) == kind


def test_added_time_is_ours_only() -> None:
    trace = ChatTrace()
    # Arrived at 0; upstream request sent at 1 ms; its head at 501 ms; first client byte at 503 ms.
    trace.upstream_at, trace.upstream_ttfb, trace.ttfb = 0.001, 0.5, 0.503
    assert trace.added == pytest.approx(0.003)
    # A stream: its head at 501 ms, the read that made the first client byte at 900 ms, the
    # byte at 902 ms: the model's 399 ms between head and token are not chatgate's.
    trace.ttfb, trace.upstream_read_at = 0.902, 0.900
    assert trace.added == pytest.approx(0.003)
    trace.upstream_ttfb = None
    assert trace.added is None
