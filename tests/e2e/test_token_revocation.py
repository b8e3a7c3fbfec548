"""A revoked token is refused on its very next request by every instance, though each instance
keeps the tokens it verified: two processes on one PostgreSQL database (with and without Redis),
two on one SQLite file; revoked through the CLI and through the API of one of them."""

from __future__ import annotations

import base64
import os
import sqlite3
import uuid
from collections.abc import Callable

import pytest
from tests.support import ChatgateServer, services, wait_until

from chatgate.store.listener import APPLICATION_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.security]

Pair = tuple[ChatgateServer, ChatgateServer]
REFUSED = {"message": "API token is invalid or revoked"}


@pytest.fixture(params=["no-redis", "redis"])
def pair(request: pytest.FixtureRequest, backend: str, make_chatgate: Callable[..., ChatgateServer]) -> Pair:
    """Two instances on one database (a PostgreSQL database, or one SQLite file); Redis or not."""
    env: dict[str, object] = {"secret_key": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    if request.param == "redis":
        services.require("Redis", services.redis_problem())
        env |= {"redis_url": services.REDIS_URL, "redis_prefix": f"chatgate-test:{uuid.uuid4().hex[:8]}:"}
    a = make_chatgate(**env)
    b = make_chatgate(database_url=a.env["CHATGATE_DATABASE_URL"], **env)
    return a, b


def status(server: ChatgateServer, token: str) -> int:
    with server.client(token) as client:
        response = client.get("/api/models")
    if response.status_code == 401:
        assert response.json() == REFUSED
    return response.status_code


def warm(a: ChatgateServer, b: ChatgateServer, token: str) -> None:
    """Verified (and so kept) by both instances."""
    for _ in range(3):
        assert status(a, token) == 200
        assert status(b, token) == 200


def test_a_revoked_token_is_refused_by_every_instance_on_its_next_request(pair: Pair, backend: str) -> None:
    a, b = pair
    name = f"revokee-{uuid.uuid4().hex[:8]}"
    by_cli, untouched = a.new_user(name), a.cli("tokens", "create", "--user", name).stdout.strip()
    by_sql = a.cli("tokens", "create", "--user", name).stdout.strip()
    with a.client() as admin:
        by_api = [admin.post("/api/tokens", json={"user": name}).json() for _ in range(5)]
    for token in (by_cli, untouched, by_sql, *(made["token"] for made in by_api)):
        warm(a, b, token)

    # The CLI: another process, which no instance hears from but through the database.
    revoked = a.cli("tokens", "revoke", by_cli[:10])
    assert revoked.returncode == 0, revoked.stderr
    assert status(b, by_cli) == 401  # the very next request, on an instance that did not revoke
    assert status(a, by_cli) == 401

    # The API of one instance, then straight to the other: no pause to let news travel.
    with a.client() as admin:
        for made in by_api:
            assert admin.delete(f"/api/tokens/{made['id']}").status_code == 200
            assert status(b, made["token"]) == 401
            assert status(a, made["token"]) == 401

    # Whoever changes the table (a DBA, a script): PostgreSQL's trigger, SQLite's data_version.
    if backend == "postgresql":
        services.sql(
            a.env["CHATGATE_DATABASE_URL"],
            "UPDATE chatgate_tokens SET revoked_at = now() WHERE prefix = $1",
            by_sql[:10],
        )
    else:
        db = sqlite3.connect(a.env["CHATGATE_DATABASE_URL"].removeprefix("sqlite:///"), isolation_level=None)
        try:
            db.execute("UPDATE chatgate_tokens SET revoked_at = '2026-01-01 00:00:00' WHERE prefix = ?", (by_sql[:10],))
        finally:
            db.close()
    assert status(b, by_sql) == 401
    assert status(a, by_sql) == 401

    assert status(b, untouched) == 200  # the user's other token still works
    assert status(a, untouched) == 200


@pytest.mark.postgres
@pytest.mark.backends("postgresql")
def test_while_an_instance_cannot_listen_its_kept_tokens_are_not_trusted(
    make_chatgate: Callable[..., ChatgateServer],
) -> None:
    server = make_chatgate()
    url = server.env["CHATGATE_DATABASE_URL"]
    token, kept = server.new_user(), server.new_user()
    for t in (token, kept):
        assert status(server, t) == 200
    assert server.process is not None and server.process.proc is not None
    pid = server.process.proc.pid
    # The notifications are lost while nobody listens; here none is even sent (trigger off), so
    # only a cache that stops trusting itself when its listener goes can refuse the token.
    services.sql(url, "ALTER TABLE chatgate_tokens DISABLE TRIGGER chatgate_tokens_notify")
    killed = services.sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        f"{APPLICATION_NAME} {pid}",
    )
    assert len(killed) == 1
    services.sql(url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE prefix = $1", token[:10])
    assert status(server, token) == 401
    assert status(server, kept) == 200
    wait_until(lambda: "not listening for token changes" in server.log_text())
    services.sql(url, "ALTER TABLE chatgate_tokens ENABLE TRIGGER chatgate_tokens_notify")
    wait_until(lambda: "listening for token changes again" in server.log_text(), timeout=10)
    assert status(server, kept) == 200
    services.sql(url, "UPDATE chatgate_tokens SET revoked_at = now() WHERE prefix = $1", kept[:10])
    assert status(server, kept) == 401
