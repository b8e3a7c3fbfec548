"""The long-lived resources of one server process, created in the lifespan and closed there."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import Accounts
from chatgate.api.asgi import Scope
from chatgate.cache import LRUCache
from chatgate.config import Settings
from chatgate.errors import NotFound
from chatgate.registry import ModelRecord, Registry
from chatgate.security.auth import Authenticator
from chatgate.security.keys import Keys
from chatgate.security.limits import Limiter, MemoryLimiter
from chatgate.security.principal import Principal
from chatgate.security.ssrf import (
    GuardedResolver,
    UpstreamPolicy,
    check_literal_host,
    check_url,
    effective_base_url,
    parse_base_url,
)
from chatgate.security.supabase import SupabaseVerifier
from chatgate.store import db
from chatgate.upstream.client import UpstreamClient

log = logging.getLogger("chatgate")

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret


def upstream_policy(settings: Settings) -> UpstreamPolicy:
    return UpstreamPolicy.from_settings(settings.allow_private_upstreams, settings.upstream_allowlist)


def build_registry(settings: Settings, engine: AsyncEngine, keys: Keys) -> Registry:
    policy = upstream_policy(settings)

    async def check(url: str) -> None:
        await check_url(url, policy)

    def check_connect(url: str) -> None:
        check_literal_host(parse_base_url(effective_base_url(url)).raw_host or "", policy)

    return Registry(
        engine,
        keys,
        check_url=check,
        check_connect=check_connect,
        cache=LRUCache(settings.model_cache_size, settings.model_cache_ttl),
    )


def supabase_verifier(settings: Settings) -> SupabaseVerifier | None:
    secret = settings.supabase_jwt_secret.get_secret_value()
    if not secret and not settings.supabase_jwks_url:
        return None
    return SupabaseVerifier(secret or None, settings.supabase_jwks_url or None, settings.supabase_audience)


async def bootstrap_admin(settings: Settings, accounts: Accounts) -> None:
    """First start with no users: create `admin`, print its token once, keep it in an owner-only file."""
    token = await accounts.bootstrap_admin()
    if token is None:
        return
    path = settings.data_dir / ADMIN_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    # Printed, not logged: log pipelines keep lines forever; this is shown once, to the operator.
    print(
        f"\nCreated the first user 'admin'. Its API token (shown once; also saved to {path}):\n\n"
        f"    {token}\n\nUse it as: Authorization: Bearer <token>\n",
        file=sys.stderr,
        flush=True,
    )


@dataclass
class Runtime:
    """Everything a request needs, built once per process."""

    settings: Settings
    engine: AsyncEngine
    registry: Registry
    accounts: Accounts
    authenticator: Authenticator
    limiter: Limiter
    upstream: UpstreamClient
    supabase: SupabaseVerifier | None

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        engine = db.create_engine(settings.database_url)
        if settings.migrate_on_start:
            await db.upgrade(engine)
        accounts = Accounts(engine)
        await bootstrap_admin(settings, accounts)
        supabase = supabase_verifier(settings)
        upstream = UpstreamClient(settings, resolver=GuardedResolver(upstream_policy(settings)))
        await upstream.start()
        return cls(
            settings=settings,
            engine=engine,
            registry=build_registry(settings, engine, Keys.from_settings(settings)),
            accounts=accounts,
            authenticator=Authenticator(accounts, supabase),
            limiter=MemoryLimiter(settings.rate_limit_per_minute, settings.max_concurrent_streams),
            upstream=upstream,
            supabase=supabase,
        )

    async def close(self) -> None:
        await self.upstream.close()
        if self.supabase is not None:
            await self.supabase.aclose()
        await self.engine.dispose()

    async def admit(self, scope: Scope) -> Principal:
        """Authenticate the request and count it against the caller's rate limit."""
        principal = await self.authenticator.authenticate(scope["headers"])
        await self.limiter.hit(str(principal.user_id))
        return principal

    async def model_for_chat(self, principal: Principal, model_id: uuid.UUID) -> ModelRecord:
        """The model a chat goes to; one the caller may not use does not exist for them."""
        record = await self.registry.for_chat(model_id)
        if not principal.may_use(record.user_id, record.sharing):
            raise NotFound("Model not found")
        return record
