"""Prometheus metrics of one process, served at `GET /metrics`.

A registry per process (not prometheus-client's global one), so that several apps in one
interpreter (tests) do not share counts.

The hot path pays for a chat once, at its end (`observe`), from the figures its `ChatTrace`
gathered anyway; nothing is done per chunk. The chat metrics are plain counts in dicts keyed by
label values, turned into metric families only when scraped: prometheus_client's own children
cost ~6 µs a chat (`.labels()` builds and validates a key; each observation takes two locks),
these ~1.5 µs. Gauges that describe state (streams in flight, pool connections) are read when
scraped, not kept up to date.

Label cardinality is bounded: the `model` label is the upstream model name (`gen_ai.request.model`)
for the first `max_models` names a process sees, and `other` for every later one, so 10,000 user
models give at most `max_models + 2` series per label set; `none` is a chat that never reached
a model (unauthenticated, unknown model, bad request).

Several worker processes (`serve --workers N`): every figure is plain data (label values to a
count, or to bucket counts and a sum; three gauges), so `worker_metrics.SharedMetrics` writes
each worker's to a file and the worker answering a scrape sums them all, without a `pid` label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate

from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


Gauges = tuple[int, int, int]  # streams in flight, upstream connections open, idle


class _StateCollector(Collector):
    """Gauges of the live process(es), read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        gauges = self._metrics.gauges()
        if gauges is None:
            return
        in_flight, open_, idle = gauges
        yield GaugeMetricFamily(
            "chatgate_streams_in_flight", "Chats with an upstream request open now.", value=in_flight
        )
        pool = GaugeMetricFamily(
            "chatgate_upstream_connections", "Upstream connections of the pool, by state.", labels=["state"]
        )
        pool.add_metric(["open"], open_)
        pool.add_metric(["idle"], idle)
        yield pool

    def describe(self) -> Iterable[Metric]:
        return []


class _Histogram:
    """One label set's bucket counts, as plain numbers: observing is a bisect and two additions.
    prometheus_client's own takes a lock per bucket and per sum (~1 µs an observation, 6 µs a
    chat); chatgate observes and renders on the event loop's one thread, so no lock is needed."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last is +Inf
        self.total = 0.0

    def add(self, value: float, bounds: tuple[float, ...]) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # `le` is inclusive: bisect_left
        self.total += value


class _Series:
    """What the chats of one route and model label update: their histograms, held directly,
    and their request counters' keys by status."""

    __slots__ = (
        "added",
        "duration",
        "first_chunk",
        "input_tokens",
        "model",
        "output_tokens",
        "requests",
        "route",
        "upstream",
    )

    def __init__(
        self,
        route: str,
        model: str,
        duration: _Histogram,
        first_chunk: _Histogram,
        upstream: _Histogram,
        input_tokens: _Histogram,
        output_tokens: _Histogram,
        added: _Histogram,
    ) -> None:
        self.route = route
        self.model = model
        self.duration = duration
        self.first_chunk = first_chunk
        self.upstream = upstream
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.added = added
        self.requests: dict[int, tuple[str, tuple[str, ...]]] = {}


# name: (help, label names, buckets)
_HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "gen_ai_client_operation_duration_seconds": (
        "Chat duration, from the request's arrival to its last byte (GenAI convention).",
        ("route", "model"),
        DURATION_BUCKETS,
    ),
    "gen_ai_client_operation_time_to_first_chunk_seconds": (
        "From the request's arrival to the first byte of the answer sent to the client.",
        ("route", "model"),
        FIRST_CHUNK_BUCKETS,
    ),
    "chatgate_upstream_time_to_first_byte_seconds": (
        "From the upstream request sent to the model server's response head.",
        ("model",),
        FIRST_CHUNK_BUCKETS,
    ),
    "chatgate_added_seconds": (
        "chatgate's own time in a chat: request arrival to upstream request sent, plus the upstream "
        "read that made the client's first byte to that byte.",
        ("route",),
        ADDED_BUCKETS,
    ),
    "gen_ai_client_token_usage": (
        "Tokens per chat as the model server counted them, by type (input, output).",
        ("model", "gen_ai_token_type"),
        TOKEN_BUCKETS,
    ),
}
_DURATION, _FIRST_CHUNK, _UPSTREAM, _ADDED, _TOKENS = _HISTOGRAMS
_BOUNDS = {name: buckets for name, (_doc, _labels, buckets) in _HISTOGRAMS.items()}
# The `le` labels as prometheus_client writes them ("1.6777216e+07").
_LE: dict[float, str] = {
    bound: floatToGoString(bound)  # type: ignore[no-untyped-call]
    for buckets in _BOUNDS.values()
    for bound in buckets
}
# name: (help, label names)
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatgate_requests": (
        "Chat requests, by route, model and status class (a client that left counts as 4xx).",
        ("route", "model", "status_class"),
    ),
    "chatgate_upstream_failures": (
        "Chats the model server failed, by kind: connect, timeout, status, cut, protocol.",
        ("kind",),
    ),
    "chatgate_client_disconnects": ("Chats whose client left before the answer ended.", ("route",)),
    "chatgate_database_errors": ("Chats answered 503 because the database did not answer.", ()),
    "chatgate_redis_errors": (
        "Redis calls that failed or timed out, by operation; chatgate carried on without Redis.",
        ("operation",),
    ),
    "chatgate_limits_fail_open": (
        "Requests admitted without a rate or stream-cap check because Redis was unavailable.",
        (),
    ),
    "chatgate_model_cache_invalidations": (
        "Model-cache invalidations received from other instances (Redis pub/sub).",
        (),
    ),
    "chatgate_retries": ("Retries of a failed upstream request on the same model, by model.", ("model",)),
    "chatgate_fallbacks": ("Chats that failed over from this model to another one, by model.", ("model",)),
    "chatgate_breaker_openings": ("Times a model's circuit breaker opened (it is then skipped).", ("model",)),
}
_REQUESTS, _FAILURES, _GONE, _DATABASE, _REDIS_ERRORS, _FAIL_OPEN, _INVALIDATIONS, *_ = _COUNTERS

Counts = dict[tuple[str, tuple[str, ...]], int]
Histograms = dict[tuple[str, tuple[str, ...]], _Histogram]


class _ChatCollector(Collector):
    """The counters and histograms, rendered from the plain counts `Metrics.figures` gives."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        counts, histograms = self._metrics.figures()
        for name, (doc, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            if not labels:  # one series: shown from the start, at 0
                family.add_metric((), counts.get((name, ()), 0))
            else:
                for (counter, values), count in counts.items():
                    if counter == name:
                        family.add_metric(values, count)
            yield family
        for name, (doc, labels, bounds) in _HISTOGRAMS.items():
            histogram_family = HistogramMetricFamily(name, doc, labels=labels)
            for (histogram, values), kept in histograms.items():
                if histogram == name:
                    cumulative = list(accumulate(kept.counts))
                    buckets = [(_LE[b], c) for b, c in zip(bounds, cumulative, strict=False)]
                    buckets.append(("+Inf", cumulative[-1]))
                    histogram_family.add_metric(values, buckets, kept.total)
            yield histogram_family

    def describe(self) -> Iterable[Metric]:
        return []


class _Count:
    """A counter kept as a plain count, with the part of prometheus_client's `Counter` API that
    chatgate uses (`labels(...).inc()`, `inc()`), so that it sums across workers like the rest."""

    __slots__ = ("_counts", "_key")

    def __init__(self, counts: Counts, name: str, labels: tuple[str, ...] = ()) -> None:
        self._counts = counts
        self._key = (name, labels)

    def labels(self, *values: str) -> _Count:
        return _Count(self._counts, self._key[0], values)

    def inc(self) -> None:
        self._counts[self._key] = self._counts.get(self._key, 0) + 1


class Metrics:
    """The metrics chatgate keeps."""

    def __init__(self, *, max_models: int = 50) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_models = max_models
        self._models: set[str] = set()
        # route -> model label -> series; a name without a label of its own is looked up as `other`.
        self._series: dict[str, dict[str, _Series]] = {}
        # Plain counts keyed by (metric, label values), rendered by _ChatCollector at a scrape.
        self.counts: Counts = {}
        self.histograms: Histograms = {}
        self._in_flight: Callable[[], int] | None = None
        self._pool: Callable[[], tuple[int, int]] | None = None
        registry = self.registry
        Info("chatgate_build", "The running chatgate.", registry=registry).info({"version": __version__})
        registry.register(_ChatCollector(self))
        registry.register(_StateCollector(self))
        self.redis_errors = _Count(self.counts, _REDIS_ERRORS)
        self.limits_fail_open = _Count(self.counts, _FAIL_OPEN)
        self.cache_invalidations = _Count(self.counts, _INVALIDATIONS)

    def watch(self, in_flight: Callable[[], int], pool: Callable[[], tuple[int, int]]) -> None:
        """Report streams in flight and the upstream pool's connections, read at each scrape."""
        self._in_flight = in_flight
        self._pool = pool

    def figures(self) -> tuple[Counts, Histograms]:
        """The counts and histograms to render (this process's)."""
        return self.counts, self.histograms

    def gauges(self) -> Gauges | None:
        """Streams in flight and pool connections (open, idle) now; None until watched."""
        if self._in_flight is None or self._pool is None:
            return None
        return (self._in_flight(), *self._pool())

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

    def _count(self, name: str, labels: tuple[str, ...]) -> None:
        key = (name, labels)
        self.counts[key] = self.counts.get(key, 0) + 1

    def count_model(self, counter: str, model: str) -> None:
        """Count a failover event (`chatgate_retries`, `_fallbacks`, `_breaker_openings`) for a
        model, by its bounded label."""
        self._count(counter, (self.model_label(model),))

    def _histogram(self, name: str, labels: tuple[str, ...]) -> _Histogram:
        key = (name, labels)
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = _Histogram(len(_BOUNDS[name]))
        return histogram

    def _series_of(self, route: str, name: str) -> _Series:
        """The series a chat of `route` with the upstream model `name` updates. Kept per name only
        for the names that have their own label, so that this stays bounded as the labels are."""
        model = self.model_label(name)
        by_model = self._series.setdefault(route, {})
        series = by_model.get(model)
        if series is None:
            series = by_model[model] = _Series(
                route,
                model,
                self._histogram(_DURATION, (route, model)),
                self._histogram(_FIRST_CHUNK, (route, model)),
                self._histogram(_UPSTREAM, (model,)),
                self._histogram(_TOKENS, (model, "input")),
                self._histogram(_TOKENS, (model, "output")),
                self._histogram(_ADDED, (route,)),
            )
        return series

    def observe(self, trace: ChatTrace) -> None:
        """Count one finished chat (called once, at its end, on the event loop).

        A chat updates its route and model's `_Series`, found with two dict lookups: no label
        tuple is built per chat (an earlier version built and hashed eight, about 2.2 µs a chat,
        and the bench's CPU per request showed more than that with metrics on)."""
        by_model = self._series.get(trace.endpoint)
        series = by_model.get(trace.model) if by_model is not None else None
        if series is None:
            series = self._series_of(trace.endpoint, trace.model)
        status = trace.status or (499 if trace.client_gone else 500)
        key = series.requests.get(status)
        if key is None:
            key = series.requests[status] = (_REQUESTS, (series.route, series.model, status_class(status)))
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if (value := trace.duration) is not None:
            series.duration.add(value, DURATION_BUCKETS)
        if (value := trace.ttfb) is not None:
            series.first_chunk.add(value, FIRST_CHUNK_BUCKETS)
        if (value := trace.upstream_ttfb) is not None:
            series.upstream.add(value, FIRST_CHUNK_BUCKETS)
        if (tokens := trace.prompt_tokens) is not None:
            series.input_tokens.add(tokens, TOKEN_BUCKETS)
        if (tokens := trace.completion_tokens) is not None:
            series.output_tokens.add(tokens, TOKEN_BUCKETS)
        if (value := trace.added) is not None:
            series.added.add(value, ADDED_BUCKETS)
        route = series.route
        if trace.error_kind is not None:
            if trace.error_kind == "database":
                self._count(_DATABASE, ())
            else:
                self._count(_FAILURES, (trace.error_kind,))
        if trace.client_gone:
            self._count(_GONE, (route,))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
