"""The database going away: requests answer 503 quickly, the process stays up and recovers.

The server runs on a PostgreSQL server of the test's own (`PrivatePostgres`), which the test
stops, restarts and freezes; the shared one is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from tests.support import ChatgateServer, FakeUpstream, free_port, scripts, services, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.backends("postgresql")]

TIMEOUT = 1.0  # CHATGATE_DATABASE_TIMEOUT of these servers


@pytest.fixture
def private_pg() -> Iterator[services.PrivatePostgres]:
    services.require("PostgreSQL's initdb", None if services.PrivatePostgres.binaries() else "no initdb found")
    pg = services.PrivatePostgres(free_port())
    try:
        pg.init().start()
        yield pg
    finally:
        pg.cleanup()


def chat(server: ChatgateServer, model: str, name: str, token: str | None = None) -> httpx.Response:
    body = {"chatSettings": {"model": name}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model}
    with server.client(token, timeout=30) as client:
        return client.post("/api/chat/custom", json=body)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.fixture
def served(
    private_pg: services.PrivatePostgres, make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> tuple[ChatgateServer, str, str]:
    server = make_chatgate(database_url=private_pg.url, database_timeout=TIMEOUT)
    name = unique_name("m")
    fake.script(name, [scripts.stream("before")] + [scripts.stream("after")] * 20)
    model = server.add_model(base_url=fake.base_url, model_id=name)
    assert chat(server, model, name).text == "before"
    return server, model, name


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"message": "The database is unavailable; try again shortly"}


def test_database_down_is_503_then_recovers_by_itself(
    private_pg: services.PrivatePostgres, served: tuple[ChatgateServer, str, str]
) -> None:
    server, model, name = served
    private_pg.stop("immediate")

    response, took = timed(lambda: chat(server, model, name))
    assert_unavailable(response)
    assert took < TIMEOUT + 1
    with server.client() as client:
        assert_unavailable(client.get("/api/models"))
        assert client.get("/healthz").status_code == 200  # the process is up
    assert "database unavailable" in server.log_text()

    private_pg.start()
    recovered = wait_until(lambda: (r := chat(server, model, name)).status_code == 200 and r, timeout=10)
    assert recovered.text == "after"
    assert server.process is not None and server.process.running


def test_hung_database_is_503_within_one_timeout(
    private_pg: services.PrivatePostgres, served: tuple[ChatgateServer, str, str]
) -> None:
    server, model, name = served
    # A token not verified yet needs the database; the admin's, verified by `served`, is kept
    # in memory only while the database answers the listener (see below).
    fresh = server.new_user(admin=True)
    private_pg.freeze()  # connections are accepted, nothing is answered
    try:
        # The first requests meet a pooled connection whose ping hangs, then a connect that hangs:
        # together they get one timeout, not one each.
        took = []
        for _ in range(3):
            response, seconds = timed(lambda: chat(server, model, name, fresh))
            assert_unavailable(response)
            took.append(seconds)
        with server.client(timeout=30) as client:
            listed, seconds = timed(lambda: client.get("/api/models"))
        assert_unavailable(listed)
        took.append(seconds)
        assert max(took) < TIMEOUT + 0.6, took
        # The kept token too, once the listener's last answered ping is older than confirm_wait
        # (0.5 s here): no revocation can have been missed before that.
        refused = wait_until(lambda: (r := chat(server, model, name)).status_code == 503 and r, timeout=5)
        assert_unavailable(refused)
    finally:
        private_pg.thaw()
    recovered = wait_until(lambda: (r := chat(server, model, name)).status_code == 200 and r, timeout=10)
    assert recovered.text == "after"
