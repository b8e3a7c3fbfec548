"""`SharedMetrics` in-process: workers' files summed exactly, a restarted worker carrying on from
its slot's file, a dead worker's gauges left out; and the settings `serve --workers` checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatgate.config import Settings, usable_cores
from chatgate.metrics import Metrics
from chatgate.trace import ChatTrace
from chatgate.worker_metrics import SOON, SharedMetrics
from chatgate.workers import WorkersProblem, check


def finished(model: str, status: int = 200, *, tokens: int | None = 5) -> ChatTrace:
    trace = ChatTrace(endpoint="/api/chat/custom", model=model, status=status, completion_tokens=tokens)
    trace.duration = 0.25
    return trace


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def count(metrics: Metrics, model: str, status_class: str = "2xx") -> float:
    labels = frozenset({"route": "/api/chat/custom", "model": model, "status_class": status_class}.items())
    return samples(metrics).get(("chatgate_requests_total", labels), 0.0)


def test_every_worker_answers_the_sum_of_all() -> None:
    async def go(run_dir: Path) -> None:
        one, two = SharedMetrics(run_dir, 1), SharedMetrics(run_dir, 2)
        one.watch(lambda: 2, lambda: (3, 1))
        two.watch(lambda: 1, lambda: (1, 0))
        for metrics in (one, two):
            metrics.start()
        two.redis_errors.labels("hit").inc()
        for _ in range(3):
            one.observe(finished("a"))
        two.observe(finished("a"))
        two.observe(finished("b", 502, tokens=None))
        await asyncio.sleep(SOON + 0.05)  # a worker writes its file SOON after a chat ends
        for metrics in (one, two):  # either worker answers the same
            assert count(metrics, "a") == 4
            assert count(metrics, "b", "5xx") == 1
            found = samples(metrics)
            assert found[("chatgate_redis_errors_total", frozenset({("operation", "hit")}))] == 1
            assert (
                found[("gen_ai_client_token_usage_count", frozenset({("model", "a"), ("gen_ai_token_type", "output")}))]
                == 4
            )
            duration = frozenset({("route", "/api/chat/custom"), ("model", "a")})
            assert found[("gen_ai_client_operation_duration_seconds_sum", duration)] == pytest.approx(1.0)
            assert found[("chatgate_streams_in_flight", frozenset())] == 3
            assert found[("chatgate_upstream_connections", frozenset({("state", "open")}))] == 4
        one.close()
        two.close()

    with_run_dir(go)


def test_a_worker_restarted_in_a_slot_carries_on_from_its_file() -> None:
    async def go(run_dir: Path) -> None:
        before = SharedMetrics(run_dir, 1, max_models=1)
        before.start()
        before.observe(finished("kept"))
        before.observe(finished("kept"))
        before.close()  # its last write; then it is gone
        after = SharedMetrics(run_dir, 1, max_models=1)
        after.start()
        assert count(after, "kept") == 2
        after.observe(finished("kept"))
        after.observe(finished("later"))  # the one model label was given out before the restart
        assert count(after, "kept") == 3
        assert count(after, "other") == 1
        after.close()

    with_run_dir(go)


def test_a_dead_workers_counts_stay_and_its_gauges_go() -> None:
    async def go(run_dir: Path) -> None:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # its pid is free now
        # What a worker killed with streams in flight left: its counts, its gauges of then.
        counts = [["chatgate_requests", ["/api/chat/custom", "a", "2xx"], 4]]
        left = {"pid": gone.pid, "counts": counts, "histograms": [], "gauges": [7, 7, 7]}
        (run_dir / "worker-2.json").write_bytes(orjson.dumps(left))
        live = SharedMetrics(run_dir, 1)
        live.watch(lambda: 1, lambda: (1, 1))
        live.start()
        live.observe(finished("a"))
        assert count(live, "a") == 5
        assert samples(live)[("chatgate_streams_in_flight", frozenset())] == 1
        live.close()

    with_run_dir(go)


def with_run_dir(go: object) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        asyncio.run(go(Path(run_dir)))  # type: ignore[operator]


def test_workers_auto_is_the_usable_cores() -> None:
    assert Settings(workers="auto").workers == usable_cores() == len(os.sched_getaffinity(0))  # type: ignore[arg-type]
    assert Settings(workers=3).workers == 3
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=0)


def test_several_workers_need_redis_for_per_user_limits() -> None:
    with pytest.raises(WorkersProblem, match=r"CHATGATE_MAX_CONCURRENT_STREAMS.*CHATGATE_REDIS_URL"):
        check(Settings(workers=2, max_concurrent_streams=2))
    assert check(Settings(workers=2, max_concurrent_streams=2, redis_url="redis://127.0.0.1:6379/0")) == []
    (warning,) = check(Settings(workers=4, model_cache_ttl=5))
    assert "the other 3 within CHATGATE_MODEL_CACHE_TTL (5 s)" in warning
