"""A real Prometheus server (Debian's `prometheus`) scrapes chatgate with the scrape token; the
added-time quantile is then asked of Prometheus in PromQL, through its HTTP API.

`make test` installs Prometheus where it can (root and apt-get); without it the test is skipped
with the reason, except under CI, where it must run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, ServerProcess, free_port, services, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]

SCRAPE_TOKEN = "scrape-token-for-prometheus"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    services.require("Prometheus", None if found else "no `prometheus` binary: `make test` installs it (apt-get)")
    assert found is not None
    return found


@pytest.fixture
def prometheus(
    tmp_path: Path, make_chatgate: Callable[..., ChatgateServer]
) -> Iterator[tuple[ChatgateServer, ServerProcess]]:
    binary = prometheus_binary()
    gateway = make_chatgate(metrics_token=SCRAPE_TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: chatgate\n"
        "    authorization:\n"
        f"      credentials: {SCRAPE_TOKEN}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway.port}']\n"
    )
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with ServerProcess(
        argv, log_path=tmp_path / "prometheus.log", cwd=tmp_path, port=port, health_path="/-/ready", startup_timeout=60
    ) as server:
        yield gateway, server


def query(server: ServerProcess, promql: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        answer = client.get("/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_added_time(
    prometheus: tuple[ChatgateServer, ServerProcess], fake: FakeUpstream
) -> None:
    gateway, server = prometheus
    name = unique_name("m")
    fake.script(name, {"steps": [{"delta": "Hi"}, {"usage": True}, {"done": True}]})
    model_id = gateway.add_model(base_url=fake.base_url, model_id=name)
    chats = 5
    with gateway.client() as client:
        for _ in range(chats):
            payload = {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model_id}
            assert client.post("/api/chat/custom", json=payload).text == "Hi"

    def scraped_all() -> list[dict[str, Any]] | None:
        result = query(server, f'sum(chatgate_requests_total{{model="{name}"}})')
        return result if result and float(result[0]["value"][1]) == chats else None

    wait_until(scraped_all, timeout=30, interval=0.5)
    (up,) = query(server, 'up{job="chatgate"}')
    assert up["value"][1] == "1"
    (quantile,) = query(server, "histogram_quantile(0.9, sum by (le) (chatgate_added_seconds_bucket))")
    added = float(quantile["value"][1])
    # A real figure from chatgate's own buckets: above zero, and far below a second on loopback.
    assert 0 < added <= 0.25
    (count,) = query(server, "sum(chatgate_added_seconds_count)")
    assert float(count["value"][1]) == chats
