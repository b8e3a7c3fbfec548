"""Prometheus counters of one process, served at `GET /metrics`.

A registry per process (not prometheus-client's global one), so that several apps in one
interpreter (tests) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The counters chatgate keeps."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.redis_errors = Counter(
            "chatgate_redis_errors",
            "Redis calls that failed or timed out, by operation; chatgate carried on without Redis.",
            ["operation"],
            registry=self.registry,
        )
        self.limits_fail_open = Counter(
            "chatgate_limits_fail_open",
            "Requests admitted without a rate or stream-cap check because Redis was unavailable.",
            registry=self.registry,
        )
        self.cache_invalidations = Counter(
            "chatgate_model_cache_invalidations",
            "Model-cache invalidations received from other instances (Redis pub/sub).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
