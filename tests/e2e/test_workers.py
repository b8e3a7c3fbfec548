"""`chatgate serve --workers 2` on SQLite, through real processes: one gateway on one port.

Which worker served a chat is read from its access line (`[worker N]` in every line a worker
logs); which worker holds an open connection, from /proc (the socket's inode among its fds).
New connections are spread by the kernel (SO_REUSEPORT), so each chat goes on a new connection
and a test sends until every worker has had its share.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support import ChatgateServer, FakeUpstream, scripts, services, unique_name, wait_until

from chatgate import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]

SCRAPE_TOKEN = "scrape-token-0123456789"
CUSTOM = "/api/chat/custom"
SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) is serving")
ACCESS = re.compile(r"chatgate\.access \[worker (\d+)\]: chat request_id=(\S+) .*? status=(\d+)")


@pytest.fixture
def make_workers(make_chatgate: Callable[..., ChatgateServer]) -> Callable[..., ChatgateServer]:
    """`make_workers(**env)`: chatgate with two workers, returned once both serve."""

    def make(**env: object) -> ChatgateServer:
        server = make_chatgate(workers=2, metrics_token=SCRAPE_TOKEN, **env)
        serving(server)
        return server

    return make


def serving(server: ChatgateServer, count: int = 2, timeout: float = 30.0) -> dict[int, int]:
    """Worker number -> pid of the latest worker in each slot, once `count` slots serve."""

    def found() -> dict[int, int] | None:
        pids = {int(m[1]): int(m[2]) for m in SERVING.finditer(server.log_text())}
        return pids if len(pids) >= count else None

    return wait_until(found, timeout)  # type: ignore[no-any-return]


def served_by(server: ChatgateServer) -> dict[str, tuple[int, int]]:
    """Request id -> (worker, status), from the access lines so far."""
    return {m[2]: (int(m[1]), int(m[3])) for m in ACCESS.finditer(server.log_text())}


def worker_of(server: ChatgateServer, request_id: str) -> int:
    found = wait_until(lambda: served_by(server).get(request_id))
    return int(found[0])


def body(model: str) -> dict[str, Any]:
    return {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}


def chat(server: ChatgateServer, model: str, token: str | None = None) -> httpx.Response:
    """One chat on a new connection (the kernel picks the worker)."""
    with server.client(token) as client:
        return client.post(CUSTOM, json=body(model))


def usage_rows(server: ChatgateServer) -> list[tuple[str, int]]:
    with sqlite3.connect(server.data_dir / "chatgate.db") as db:
        return [(str(r[0]), int(r[1])) for r in db.execute("SELECT request_id, status FROM chatgate_usage")]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ChatgateServer) -> Samples:
    with httpx.Client(base_url=server.url, trust_env=False) as client:  # a new connection: any worker
        response = client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def requests_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "chatgate_requests_total")


def test_one_preparation_and_usage_rows_from_every_worker(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers()
    log = server.log_text()
    assert log.count("Created the first user 'admin'") == 1
    assert log.count("Running upgrade  -> 0001") == 1  # migrated once, by the supervisor
    assert "[worker" not in log.split("worker 1 started")[0]  # ...before any worker started
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = server.add_model(base_url=fake.base_url, model_id=name)

    chats = 24
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: chat(server, model), range(chats)))
    assert [r.status_code for r in responses] == [200] * chats
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == chats  # every worker makes its own request ids
    # Every chat's row landed, from both workers writing the one SQLite file at once.
    rows = wait_until(lambda: (rows := usage_rows(server)) and len(rows) >= chats and rows, timeout=10)
    assert sorted(rows) == sorted((i, 200) for i in ids)
    assert {worker_of(server, i) for i in ids} == {1, 2}
    assert "database is locked" not in server.log_text()


def test_a_token_revoked_with_the_cli_is_refused_by_every_worker(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers()
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    user = unique_name("user")
    assert server.cli("users", "add", user).returncode == 0
    created = server.cli("tokens", "create", "--user", user)
    token, token_id = created.stdout.strip(), created.stderr.split()[1]  # "Token <id> for <user>"
    added = server.cli("models", "add", "--name", name, "--base-url", fake.base_url, "--model-id", name,
                       "--user", user)  # fmt: skip
    assert added.returncode == 0, added.stderr
    model = added.stdout.strip()

    def until_both(expected: int) -> None:
        seen: set[int] = set()
        for _ in range(60):
            response = chat(server, model, token)
            assert response.status_code == expected, response.text
            seen.add(worker_of(server, response.headers["x-request-id"]))
            if seen == {1, 2}:
                return
        raise AssertionError(f"only workers {seen} answered")

    until_both(200)  # each worker has used (and may keep) the token
    revoked = server.cli("tokens", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    until_both(401)  # the very next request, whichever worker takes it


def test_a_model_changed_through_one_worker_is_seen_by_the_others_within_the_cache_ttl(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    ttl = 1.0
    server = make_workers(model_cache_ttl=ttl)
    old, new = unique_name("old"), unique_name("new")
    fake.script(old, scripts.stream("old"))
    fake.script(new, scripts.stream("new"))
    model = server.add_model(base_url=fake.base_url, model_id=old)
    warmed: set[int] = set()
    while warmed != {1, 2}:  # both workers have the model cached
        response = chat(server, model)
        assert response.text == "old"
        warmed.add(worker_of(server, response.headers["x-request-id"]))
    with server.client() as client:
        assert client.patch(f"/api/models/{model}", json={"model_id": new}).status_code == 200
    changed = time.monotonic()
    time.sleep(ttl + 0.2)
    answered: set[int] = set()
    while answered != {1, 2}:
        response = chat(server, model)
        assert response.text == "new", f"{time.monotonic() - changed:.1f} s after the change"
        answered.add(worker_of(server, response.headers["x-request-id"]))


def test_limits_without_redis_refuse_to_start_several_workers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGATE_")}
    env |= {"CHATGATE_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite", "CHATGATE_RATE_LIMIT_PER_MINUTE": "10"}
    done = subprocess.run(
        [sys.executable, "-m", "chatgate", "serve", "--workers", "2", "--port", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "CHATGATE_RATE_LIMIT_PER_MINUTE" in message and "CHATGATE_REDIS_URL" in message
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "db.sqlite").exists()  # refused before touching anything


@pytest.mark.redis
def test_limits_hold_in_total_across_workers_with_redis(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    services.require("Redis", services.redis_problem())
    server = make_workers(
        rate_limit_per_minute=6, redis_url=services.REDIS_URL, redis_prefix=f"chatgate-test:{unique_name('w')}:"
    )
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = server.add_model(base_url=fake.base_url, model_id=name)  # one request of the admin's 6
    admitted = [chat(server, model) for _ in range(5)]
    assert [r.status_code for r in admitted] == [200] * 5
    refused_by: set[int] = set()
    for _ in range(60):
        response = chat(server, model)
        assert response.status_code == 429, response.text
        refused_by.add(worker_of(server, response.headers["x-request-id"]))
        if refused_by == {1, 2}:
            break
    assert refused_by == {1, 2}


def test_a_killed_worker_is_restarted_and_the_counts_never_go_backwards(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers()
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = server.add_model(base_url=fake.base_url, model_id=name)
    for _ in range(10):
        assert chat(server, model).status_code == 200
    wait_until(lambda: requests_total(scrape(server)) == 10)

    victim = serving(server)[2]
    os.kill(victim, signal.SIGKILL)
    restarted = wait_until(lambda: (pid := serving(server)[2]) != victim and pid, timeout=30)
    said = rf"worker 2 \(pid {victim}\) was killed by SIGKILL after [\d.]+ s; starting a new one in 0.5 s"
    assert re.search(said, server.log_text())
    totals = [requests_total(scrape(server)) for _ in range(6)]  # answered by either worker
    assert totals == [10] * 6
    for _ in range(10):
        assert chat(server, model).status_code == 200
    wait_until(lambda: requests_total(scrape(server)) == 20)
    assert restarted in serving(server).values()


def test_metrics_sum_exactly_over_the_workers_after_a_known_mix(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers()
    ok, failing = unique_name("ok"), unique_name("failing")
    fake.script(ok, {"steps": [{"role": "assistant"}, {"delta": "Hello"}, {"usage": True}, {"done": True}]})
    fake.script(failing, {"status": 500, "steps": [{"body": {"error": {"message": "boom"}}}]})
    ok_model = server.add_model(base_url=fake.base_url, model_id=ok)
    failing_model = server.add_model(base_url=fake.base_url, model_id=failing)
    plan = [ok_model] * 14 + [failing_model] * 6
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda m: chat(server, m), plan))
    assert sorted(r.status_code for r in responses) == [200] * 14 + [500] * 6
    workers = {worker_of(server, r.headers["x-request-id"]) for r in responses}
    assert workers == {1, 2}

    samples = wait_until(lambda: (s := scrape(server)) and requests_total(s) == 20 and s)
    requests = {
        dict(labels)["model"] + " " + dict(labels)["status_class"]: v
        for (n, labels), v in samples.items()
        if n == "chatgate_requests_total"
    }
    assert requests == {f"{ok} 2xx": 14, f"{failing} 5xx": 6}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("chatgate_upstream_failures_total", kind="status") == 6
    assert value("gen_ai_client_operation_duration_seconds_count", route=CUSTOM, model=ok) == 14
    assert value("gen_ai_client_token_usage_count", model=ok, gen_ai_token_type="output") == 14
    assert value("chatgate_upstream_time_to_first_byte_seconds_count", model=failing) == 6
    assert value("chatgate_added_seconds_count", route=CUSTOM) == 14  # the chats that answered
    assert value("chatgate_streams_in_flight") == 0
    assert value("chatgate_build_info", version=__version__) == 1

    def counted(samples: Samples) -> Samples:  # the pool's gauges change as idle connections expire
        return {k: v for k, v in samples.items() if not k[0].startswith("chatgate_upstream_connections")}

    assert all(counted(scrape(server)) == counted(samples) for _ in range(6)), "every worker answers the same sums"


def connection_holder(pids: dict[int, int], server_port: int, client_port: int) -> int | None:
    """The worker whose process holds the server side of the connection from `client_port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        if local_port == server_port and remote_port == client_port:
            inodes.add(f"socket:[{fields[9]}]")
    for worker, pid in pids.items():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return worker
            except OSError:
                continue
    return None


@contextmanager
def held_stream(server: ChatgateServer, model: str, into: dict[str, Any]) -> Iterator[int | None]:
    """A stream that has begun; yields the worker that holds it, reads the rest on exit."""
    with server.client(timeout=60.0) as client, client.stream("POST", CUSTOM, json=body(model)) as response:
        chunks = response.iter_raw()
        into["received"] = next(chunks)
        client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        yield connection_holder(serving(server), server.port, client_port)
        into["received"] += b"".join(chunks)
        into["status"] = response.status_code


def test_sigterm_drains_every_worker_and_their_streams_complete(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers(drain_timeout=20)
    name, gate = unique_name("m"), unique_name("gate")
    fake.script(name, {"steps": [{"delta": "first"}, {"wait": gate}, {"delta": " and last"}, {"done": True}]})
    model = server.add_model(base_url=fake.base_url, model_id=name)
    assert server.process is not None and server.process.proc is not None
    supervisor = server.process.proc

    results: list[dict[str, Any]] = []
    holders: set[int | None] = set()
    with ExitStack() as streams:
        while holders != {1, 2}:
            assert len(results) < 30, f"the streams all went to {holders}"
            results.append({})
            holders.add(streams.enter_context(held_stream(server, model, results[-1])))
        supervisor.send_signal(signal.SIGTERM)
        wait_until(lambda: server.log_text().count("running chats may take") == 1)
        threading.Timer(0.5, fake.release, [gate]).start()
        # Leaving the block reads every stream to its end.
    assert [r["received"] for r in results] == [b"first and last"] * len(results)
    assert supervisor.wait(30) == 0
    log = server.log_text()
    assert "worker 1 (pid" in log and "stopped" in log
    assert len(re.findall(r"worker \d \(pid \d+\) stopped", log)) == 2
    assert "Traceback" not in log
    assert sorted(s for _, s in usage_rows(server)) == [200] * len(results)


def test_ctrl_c_drains_once_and_a_second_one_stops_at_once(
    make_workers: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_workers(drain_timeout=30)
    name, gate = unique_name("m"), unique_name("gate")
    fake.script(name, {"steps": [{"delta": "first"}, {"wait": gate}, {"delta": " and last"}, {"done": True}]})
    model = server.add_model(base_url=fake.base_url, model_id=name)
    assert server.process is not None and server.process.proc is not None
    supervisor = server.process.proc
    result: dict[str, Any] = {}
    try:
        with pytest.raises(httpx.HTTPError), held_stream(server, model, result) as holder:
            assert holder in (1, 2)
            # A Ctrl-C reaches the whole process group: the workers leave it to the supervisor,
            # which passes it on once, so this is one drain, not a forced stop.
            os.killpg(supervisor.pid, signal.SIGINT)
            wait_until(lambda: "SIGINT: draining 2 worker(s)" in server.log_text())
            time.sleep(1.0)
            assert supervisor.poll() is None and "stopping now" not in server.log_text()
            os.killpg(supervisor.pid, signal.SIGINT)  # the second: stop at once
            assert supervisor.wait(15) == 0
    finally:
        fake.release(gate)
    assert result["received"] == b"first"  # cut short, never completed
    assert "SIGINT again: stopping the workers now" in server.log_text()


def test_a_second_supervisor_on_the_same_port_is_refused(make_workers: Callable[..., ChatgateServer]) -> None:
    server = make_workers()
    other = server.data_dir.parent / "other"
    other.mkdir()
    env = {**server.env, "CHATGATE_DATABASE_URL": f"sqlite:///{other}/db.sqlite", "CHATGATE_DATA_DIR": str(other)}
    done = subprocess.run(
        [sys.executable, "-m", "chatgate", "serve", "--workers", "2"],
        capture_output=True, text=True, env=env, cwd=other, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot serve on 127.0.0.1:{server.port}: Address already in use" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
