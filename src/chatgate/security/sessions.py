"""Console sessions: a chatgate API token exchanged for an `HttpOnly` session cookie.

The browser never keeps the token (no `localStorage` for a script to read); it holds a random
session id that the database knows only by its sha256, like tokens. A session belongs to the
token that opened it: revoking that token, or deleting its user, ends the session too. Signing
out deletes the row, so a copied cookie is dead from then on.

CSRF: the cookie is `SameSite=Strict`, so other sites' pages never send it; and a state-changing
request that authenticates with it must carry an `Origin` naming this host (browsers send one
with every POST, PATCH and DELETE), which also refuses sibling origins on the same site.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.errors import Forbidden, Unauthorized
from chatgate.security.principal import Principal
from chatgate.security.tokens import constant_time_equals, token_hash
from chatgate.store.schema import sessions, tokens, users
from chatgate.store.values import as_utc, as_uuid

__all__ = ["SESSION_COOKIE", "SESSION_TTL", "Session", "Sessions", "check_origin"]

SESSION_COOKIE = "chatgate_session"
SESSION_TTL = timedelta(days=7)
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


class Session:
    """A session just opened: the cookie value (shown to the browser only) and when it ends."""

    __slots__ = ("expires_at", "principal", "secret")

    def __init__(self, secret: str, principal: Principal, expires_at: datetime) -> None:
        self.secret = secret
        self.principal = principal
        self.expires_at = expires_at


class Sessions:
    """Opens, checks and ends console sessions in the database."""

    def __init__(self, engine: AsyncEngine, ttl: timedelta = SESSION_TTL) -> None:
        self._engine = engine
        self._ttl = ttl

    async def open(self, token: str) -> Session:
        """A new session for the user of a live API token; Unauthorized for any other string."""
        digest = token_hash(token)
        query = (
            sa.select(tokens.c.id, tokens.c.token_hash, users.c.id.label("user_id"), users.c.name, users.c.is_admin)
            .join(users, users.c.id == tokens.c.user_id)
            .where(tokens.c.token_hash == digest, tokens.c.revoked_at.is_(None))
        )
        now = datetime.now(UTC)
        secret = secrets.token_urlsafe(32)
        async with self._engine.begin() as conn:
            row = (await conn.execute(query)).first()
            if row is None or not constant_time_equals(row.token_hash, digest):
                raise Unauthorized("API token is invalid or revoked")
            await conn.execute(
                sessions.insert().values(
                    id_hash=token_hash(secret), token_id=row.id, created_at=now, expires_at=now + self._ttl
                )
            )
            # Expired rows go as new ones come: the table stays as small as the live sessions.
            await conn.execute(sessions.delete().where(sessions.c.expires_at < now))
        return Session(secret, Principal(as_uuid(row.user_id), row.name, bool(row.is_admin)), now + self._ttl)

    async def principal(self, secret: str) -> Principal:
        """The user of a live session; Unauthorized when it has ended, expired or its token was revoked."""
        digest = token_hash(secret)
        query = (
            sa.select(sessions.c.id_hash, sessions.c.expires_at, users.c.id, users.c.name, users.c.is_admin)
            .join(tokens, tokens.c.id == sessions.c.token_id)
            .join(users, users.c.id == tokens.c.user_id)
            .where(sessions.c.id_hash == digest, tokens.c.revoked_at.is_(None))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or not constant_time_equals(row.id_hash, digest) or as_utc(row.expires_at) <= datetime.now(UTC):
            raise Unauthorized("Session has ended: sign in again")
        return Principal(as_uuid(row.id), row.name, bool(row.is_admin))

    async def end(self, secret: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.id_hash == token_hash(secret)))


def check_origin(method: str, origin: bytes | None, host: bytes | None) -> None:
    """Refuse a state-changing request carried by the session cookie unless it comes from a page
    of this host (Forbidden: a page elsewhere asked the browser to send it)."""
    if method in _SAFE_METHODS:
        return
    if origin is None or host is None or urlsplit(origin.decode("latin-1")).netloc.lower() != host.decode().lower():
        raise Forbidden("Cross-origin request refused: a console session is only valid on its own pages")
