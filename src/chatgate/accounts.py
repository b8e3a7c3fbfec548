"""Users and API tokens: who may call chatgate. Tokens are stored only as hashes."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.errors import BadRequest, NotFound
from chatgate.security.principal import Principal
from chatgate.security.tokens import constant_time_equals, new_token, token_hash, token_prefix
from chatgate.store.listener import confirm_wait, confirmed_everywhere
from chatgate.store.schema import tokens, users


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    name: str
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as it can be shown after creation: never the token itself."""

    id: uuid.UUID
    user: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


_PRINCIPAL_BY_HASH = (
    "SELECT t.token_hash, u.id, u.name, u.is_admin FROM chatgate_tokens t"
    " JOIN chatgate_users u ON u.id = t.user_id WHERE t.token_hash = ? AND t.revoked_at IS NULL"
)


class SQLiteTokenReader:
    """The token lookup on SQLite, as a plain indexed read on the event loop's thread.

    Every request authenticates, so this is on the hot path: through SQLAlchemy and aiosqlite's
    worker thread the same read cost about 400 µs of CPU (docs/performance.md); here it costs a
    few µs. It never waits on writers (WAL mode). Answers are kept only while SQLite's
    `data_version` stays the same, which any commit by another connection (the CLI revoking a
    token, this server's own writes) changes: a revocation still takes effect at once."""

    _MAX_KEPT = 10_000

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=1.0, check_same_thread=False, isolation_level=None
        )
        self._version: int | None = None
        self._kept: dict[str, tuple[str, uuid.UUID, str, bool] | None] = {}

    def lookup(self, digest: str) -> tuple[str, uuid.UUID, str, bool] | None:
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version or len(self._kept) > self._MAX_KEPT:
            self._version = version
            self._kept.clear()
        elif digest in self._kept:
            return self._kept[digest]
        row = self._conn.execute(_PRINCIPAL_BY_HASH, (digest,)).fetchone()
        found = None if row is None else (row[0], uuid.UUID(row[1]), row[2], bool(row[3]))
        self._kept[digest] = found
        return found

    def close(self) -> None:
        self._conn.close()


class TokenCache:
    """The tokens this process has verified, for PostgreSQL, where each lookup is a round trip
    through the pool (about 0.6 ms of CPU per request, docs/performance.md).

    Trusted only while `listening()` is True, i.e. while `store.listener.ChangeListener` holds
    its subscription: every committed revocation, deletion or user change then reaches `clear`
    (from any instance, the CLI, or SQL by hand). When the listener is down nothing is served
    from here and every request reads the database, as without a cache.

    A notification arrives a little after the commit (up to milliseconds under load): so that
    the very next request is refused wherever it goes, `Accounts.revoke` returns only once every
    listening instance has confirmed it dropped its cache (`store.listener.confirmed_everywhere`).
    A change made by plain SQL has no one waiting for those confirmations: it is refused as soon
    as each instance hears of it. Invalid tokens are not cached: a new token works at once."""

    _MAX_KEPT = 10_000

    def __init__(self, listening: Callable[[], bool]) -> None:
        self._listening = listening
        self._kept: dict[str, Principal] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes with every `clear`: a lookup takes it before reading, and hands it back to `put`."""
        return self._generation

    def get(self, digest: str) -> Principal | None:
        if not self._listening():
            return None
        return self._kept.get(digest)

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        # Only when nothing was heard while the row was read: a revocation committed meanwhile
        # must not be overwritten by the answer read before it.
        if generation != self._generation or not self._listening():
            return
        if len(self._kept) >= self._MAX_KEPT:
            self._kept.clear()
        self._kept[digest] = principal

    def clear(self) -> None:
        self._generation += 1
        self._kept.clear()


class Accounts:
    """Users, tokens, and the token lookup behind authentication."""

    def __init__(
        self, engine: AsyncEngine, *, reader: SQLiteTokenReader | None = None, cache: TokenCache | None = None
    ) -> None:
        self._engine = engine
        self._reader = reader
        self._cache = cache

    @classmethod
    def for_engine(cls, engine: AsyncEngine, cache: TokenCache | None = None) -> Accounts:
        """Accounts with the fast token reader where the database is a SQLite file, else with
        `cache` (a server on PostgreSQL; the CLI has none)."""
        url = engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return cls(engine, reader=SQLiteTokenReader(url.database))
        return cls(engine, cache=cache)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    async def add_user(self, name: str, *, is_admin: bool = False) -> User:
        name = name.strip()
        if not 1 <= len(name) <= 100:
            raise BadRequest("name: must be 1 to 100 characters", param="name")
        user = User(uuid.uuid4(), name, is_admin, datetime.now(UTC))
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    users.insert().values(id=user.id, name=name, is_admin=is_admin, created_at=user.created_at)
                )
        except IntegrityError:
            raise BadRequest(f"a user named {name!r} already exists", param="name") from None
        return user

    async def user(self, name: str) -> User:
        async with self._engine.connect() as conn:
            row = (await conn.execute(users.select().where(users.c.name == name))).first()
        if row is None:
            raise NotFound(f"no user named {name!r}")
        return User(row.id, row.name, row.is_admin, row.created_at)

    async def users(self) -> list[User]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(users.select().order_by(users.c.created_at))).all()
        return [User(r.id, r.name, r.is_admin, r.created_at) for r in rows]

    async def has_users(self) -> bool:
        async with self._engine.connect() as conn:
            return (await conn.execute(sa.select(sa.func.count()).select_from(users))).scalar_one() > 0

    async def create_token(self, user_name: str) -> tuple[TokenInfo, str]:
        """A new token for the user: returns its record and the token, which is shown only now."""
        user = await self.user(user_name)
        token = new_token()
        info = TokenInfo(uuid.uuid4(), user.name, token_prefix(token), datetime.now(UTC), None)
        async with self._engine.begin() as conn:
            await conn.execute(
                tokens.insert().values(
                    id=info.id,
                    user_id=user.id,
                    token_hash=token_hash(token),
                    prefix=info.prefix,
                    created_at=info.created_at,
                )
            )
        return info, token

    async def tokens(self, user_name: str | None = None) -> list[TokenInfo]:
        query = (
            sa.select(tokens.c.id, users.c.name, tokens.c.prefix, tokens.c.created_at, tokens.c.revoked_at)
            .join(users, users.c.id == tokens.c.user_id)
            .order_by(tokens.c.created_at)
        )
        if user_name is not None:
            query = query.where(users.c.name == user_name)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [TokenInfo(*row) for row in rows]

    async def revoke(self, token_ref: str) -> TokenInfo:
        """Revoke a token given by its id or its displayed prefix."""
        matches = [t for t in await self.tokens() if str(t.id) == token_ref or t.prefix == token_ref]
        if not matches:
            raise NotFound(f"no token {token_ref!r}")
        if len(matches) > 1:
            raise BadRequest(f"{token_ref!r} names several tokens: use the token id")
        revoke = (
            tokens.update()
            .where(tokens.c.id == matches[0].id, tokens.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        async with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # Returns once every listening instance (this one included) has dropped its
                # cached tokens: the next request anywhere is refused. SQLite needs no such
                # wait: each process reads `data_version` on every request.
                step = getattr(self._engine, "step_timeout", None) or 5.0
                async with confirmed_everywhere(conn, confirm_wait(step)):
                    await conn.execute(revoke)
            else:
                async with conn.begin():
                    await conn.execute(revoke)
        if self._cache is not None:
            self._cache.clear()  # in case this instance's listener is the one that did not confirm
        return matches[0]

    async def principal_for_token(self, token: str) -> Principal | None:
        """The user a live token belongs to, or None.

        The lookup is by the token's sha256: an attacker timing the index cannot steer the hash,
        so it leaks nothing about valid tokens; the final comparison is constant-time anyway."""
        digest = token_hash(token)
        if self._reader is not None:
            found = self._reader.lookup(digest)
            if found is None or not constant_time_equals(found[0], digest):
                return None
            return Principal(found[1], found[2], found[3])
        generation = 0
        if self._cache is not None:
            principal = self._cache.get(digest)
            if principal is not None:
                return principal
            generation = self._cache.generation
        query = (
            sa.select(tokens.c.token_hash, users.c.id, users.c.name, users.c.is_admin)
            .join(users, users.c.id == tokens.c.user_id)
            .where(tokens.c.token_hash == digest, tokens.c.revoked_at.is_(None))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or not constant_time_equals(row.token_hash, digest):
            return None
        principal = Principal(row.id, row.name, bool(row.is_admin))
        if self._cache is not None:
            self._cache.put(digest, principal, generation)
        return principal

    async def bootstrap_admin(self) -> str | None:
        """On an empty user table: create the `admin` user and return its first token (else None)."""
        if await self.has_users():
            return None
        try:
            await self.add_user("admin", is_admin=True)
        except BadRequest:
            return None  # another process won the race
        _info, token = await self.create_token("admin")
        return token
