"""security/sessions.py on both backends: a session lives as long as its token and its term, and
the CSRF rule for the cookie."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from chatgate.accounts import Accounts
from chatgate.errors import Forbidden, Unauthorized
from chatgate.security.sessions import Sessions, check_origin
from chatgate.store import db


def test_a_session_ends_when_signed_out_expired_or_its_token_is_revoked(database_url: str) -> None:
    async def go() -> None:
        engine = db.create_engine(database_url)
        try:
            await db.upgrade(engine)
            accounts = Accounts(engine)
            await accounts.add_user("u")
            info, token = await accounts.create_token("u")
            sessions = Sessions(engine)

            signed_out = await sessions.open(token)
            assert (await sessions.principal(signed_out.secret)).name == "u"
            await sessions.end(signed_out.secret)
            with pytest.raises(Unauthorized):
                await sessions.principal(signed_out.secret)

            expired = await Sessions(engine, ttl=timedelta(seconds=-1)).open(token)
            with pytest.raises(Unauthorized, match="Session has ended"):
                await sessions.principal(expired.secret)

            live = await sessions.open(token)
            await accounts.revoke(str(info.id))
            with pytest.raises(Unauthorized):
                await sessions.principal(live.secret)
            with pytest.raises(Unauthorized):
                await sessions.open(token)  # a revoked token opens nothing
            with pytest.raises(Unauthorized):
                await sessions.principal("never-issued")
        finally:
            await engine.dispose()

    asyncio.run(go())


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reads_need_no_origin(method: str) -> None:
    check_origin(method, None, b"127.0.0.1:8000")


@pytest.mark.parametrize(
    "origin",
    [None, b"null", b"http://evil.example", b"http://127.0.0.1:8001", b"http://127.0.0.1.evil.example:8000"],
)
def test_writes_need_this_hosts_origin(origin: bytes | None) -> None:
    with pytest.raises(Forbidden):
        check_origin("POST", origin, b"127.0.0.1:8000")


@pytest.mark.parametrize("origin", [b"http://127.0.0.1:8000", b"https://Chat.Example.com"])
def test_a_write_from_this_host_passes(origin: bytes) -> None:
    host = b"127.0.0.1:8000" if b"127" in origin else b"chat.example.com"
    check_origin("DELETE", origin, host)
