"""Prometheus metrics of one process, served at `GET /metrics`.

A registry per process (not prometheus-client's global one), so that several apps in one
interpreter (tests) do not share counts.

The hot path pays for a chat once, at its end (`observe`), from the figures its `ChatTrace`
gathered anyway; nothing is done per chunk. `.labels()` costs a few microseconds (it builds and
validates a key), so the children are looked up once per label set and kept in dicts. Gauges that
describe state (streams in flight, pool connections) are read when scraped, not kept up to date.

Label cardinality is bounded: the `model` label is the upstream model name (`gen_ai.request.model`)
for the first `max_models` names a process sees, and `other` for every later one, so 10,000 user
models give at most `max_models + 2` series per label set; `none` is a chat that never reached
a model (unauthenticated, unknown model, bad request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatgate import __version__
from chatgate.errors import (
    ChatgateError,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgate.trace import ChatTrace

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "failure_kind"]

# The OpenTelemetry GenAI semantic conventions' explicit bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
FIRST_CHUNK_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# chatgate's own time is counted in tens of microseconds: finer buckets than any GenAI one.
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

NO_MODEL = "none"
OTHER_MODELS = "other"

_KINDS: tuple[tuple[type[ChatgateError], str], ...] = (
    (UpstreamUnreachable, "connect"),
    (UpstreamTimeout, "timeout"),
    (UpstreamStatus, "status"),
    (UpstreamIncomplete, "cut"),
    (UpstreamProtocolError, "protocol"),
)


def failure_kind(exc: ChatgateError, *, answered: bool = False) -> str | None:
    """The kind of an upstream failure, as the `kind` label counts it; None for any other error.
    A connection lost after the upstream `answered` is a cut, not a failure to connect."""
    if answered and isinstance(exc, UpstreamUnreachable):
        return "cut"
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return None


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


class _StateCollector(Collector):
    """Gauges read at scrape time from the process's live objects."""

    def __init__(self, in_flight: Callable[[], int], pool: Callable[[], tuple[int, int]]) -> None:
        self._in_flight = in_flight
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "chatgate_streams_in_flight", "Chats with an upstream request open now.", value=self._in_flight()
        )
        open_, idle = self._pool()
        pool = GaugeMetricFamily(
            "chatgate_upstream_connections", "Upstream connections of the pool, by state.", labels=["state"]
        )
        pool.add_metric(["open"], open_)
        pool.add_metric(["idle"], idle)
        yield pool

    def describe(self) -> Iterable[Metric]:
        return []


class _Timings:
    """The histogram children of one (route, model)."""

    __slots__ = ("duration", "first_chunk", "tokens_in", "tokens_out", "upstream_ttfb")

    def __init__(self, metrics: Metrics, route: str, model: str) -> None:
        self.duration = metrics.duration.labels(route, model)
        self.first_chunk = metrics.first_chunk.labels(route, model)
        self.upstream_ttfb = metrics.upstream_ttfb.labels(model)
        self.tokens_in = metrics.tokens.labels(model, "input")
        self.tokens_out = metrics.tokens.labels(model, "output")


class Metrics:
    """The metrics chatgate keeps."""

    def __init__(self, *, max_models: int = 50) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_models = max_models
        self._models: set[str] = set()
        self._requests: dict[tuple[str, str, str], Counter] = {}
        self._timings: dict[tuple[str, str], _Timings] = {}
        self._added: dict[str, Histogram] = {}
        self._failures: dict[str, Counter] = {}
        self._gone: dict[str, Counter] = {}
        registry = self.registry
        Info("chatgate_build", "The running chatgate.", registry=registry).info({"version": __version__})
        self.requests = Counter(
            "chatgate_requests",
            "Chat requests, by route, model and status class (a client that left counts as 4xx).",
            ["route", "model", "status_class"],
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Chat duration, from the request's arrival to its last byte (GenAI convention).",
            ["route", "model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "From the request's arrival to the first byte of the answer sent to the client.",
            ["route", "model"],
            buckets=FIRST_CHUNK_BUCKETS,
            registry=registry,
        )
        self.upstream_ttfb = Histogram(
            "chatgate_upstream_time_to_first_byte_seconds",
            "From the upstream request sent to the model server's response head.",
            ["model"],
            buckets=FIRST_CHUNK_BUCKETS,
            registry=registry,
        )
        self.added = Histogram(
            "chatgate_added_seconds",
            "chatgate's own time in a chat: request arrival to upstream request sent, plus upstream "
            "response head to the client's first byte.",
            ["route"],
            buckets=ADDED_BUCKETS,
            registry=registry,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per chat as the model server counted them, by type (input, output).",
            ["model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.upstream_failures = Counter(
            "chatgate_upstream_failures",
            "Chats the model server failed, by kind: connect, timeout, status, cut, protocol.",
            ["kind"],
            registry=registry,
        )
        self.client_disconnects = Counter(
            "chatgate_client_disconnects",
            "Chats whose client left before the answer ended.",
            ["route"],
            registry=registry,
        )
        self.database_errors = Counter(
            "chatgate_database_errors",
            "Chats answered 503 because the database did not answer.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "chatgate_redis_errors",
            "Redis calls that failed or timed out, by operation; chatgate carried on without Redis.",
            ["operation"],
            registry=registry,
        )
        self.limits_fail_open = Counter(
            "chatgate_limits_fail_open",
            "Requests admitted without a rate or stream-cap check because Redis was unavailable.",
            registry=registry,
        )
        self.cache_invalidations = Counter(
            "chatgate_model_cache_invalidations",
            "Model-cache invalidations received from other instances (Redis pub/sub).",
            registry=registry,
        )

    def watch(self, in_flight: Callable[[], int], pool: Callable[[], tuple[int, int]]) -> None:
        """Report streams in flight and the upstream pool's connections, read at each scrape."""
        self.registry.register(_StateCollector(in_flight, pool))

    def model_label(self, name: str) -> str:
        """`name` while fewer than `max_models` names were seen (or it is one of them), else `other`."""
        if not name:
            return NO_MODEL
        if name in self._models:
            return name
        if len(self._models) < self.max_models:
            self._models.add(name)
            return name
        return OTHER_MODELS

    def observe(self, trace: ChatTrace) -> None:
        """Count one finished chat (called once, at its end)."""
        route = trace.endpoint
        model = self.model_label(trace.model)
        status = trace.status or (499 if trace.client_gone else 500)
        key = (route, model, status_class(status))
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(*key)
        counter.inc()
        timings = self._timings.get(key[:2])
        if timings is None:
            timings = self._timings[key[:2]] = _Timings(self, route, model)
        if trace.duration is not None:
            timings.duration.observe(trace.duration)
        if trace.ttfb is not None:
            timings.first_chunk.observe(trace.ttfb)
        if trace.upstream_ttfb is not None:
            timings.upstream_ttfb.observe(trace.upstream_ttfb)
        if trace.prompt_tokens is not None:
            timings.tokens_in.observe(trace.prompt_tokens)
        if trace.completion_tokens is not None:
            timings.tokens_out.observe(trace.completion_tokens)
        added = trace.added
        if added is not None:
            histogram = self._added.get(route)
            if histogram is None:
                histogram = self._added[route] = self.added.labels(route)
            histogram.observe(added)
        if trace.error_kind is not None:
            if trace.error_kind == "database":
                self.database_errors.inc()
            else:
                failures = self._failures.get(trace.error_kind)
                if failures is None:
                    failures = self._failures[trace.error_kind] = self.upstream_failures.labels(trace.error_kind)
                failures.inc()
        if trace.client_gone:
            gone = self._gone.get(route)
            if gone is None:
                gone = self._gone[route] = self.client_disconnects.labels(route)
            gone.inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
