"""The long-lived resources of one server process, created in the lifespan and closed there."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import Accounts, TokenCache
from chatgate.api.asgi import Scope
from chatgate.breaker import Breaker
from chatgate.cache import LRUCache
from chatgate.cachebus import CacheBus
from chatgate.config import Settings
from chatgate.drain import RunningChats
from chatgate.errors import AmbiguousModel, ModelNotFound, NotFound
from chatgate.failover import Failover
from chatgate.metrics import Metrics
from chatgate.registry import ModelRecord, Registry
from chatgate.security.auth import Authenticator
from chatgate.security.keys import Keys
from chatgate.security.limits import Limiter, MemoryLimiter
from chatgate.security.principal import Principal
from chatgate.security.redis_limits import RedisLimiter
from chatgate.security.sessions import Sessions
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
from chatgate.store.listener import ChangeListener
from chatgate.tracing import Tracing
from chatgate.upstream.client import UpstreamClient
from chatgate.usage import UsageRecorder
from chatgate.worker_metrics import SharedMetrics

if TYPE_CHECKING:
    from chatgate.workers import Worker

log = logging.getLogger("chatgate")


def upstream_policy(settings: Settings) -> UpstreamPolicy:
    return UpstreamPolicy.from_settings(settings.allow_private_upstreams, settings.upstream_allowlist)


def build_registry(
    settings: Settings,
    engine: AsyncEngine,
    keys: Keys,
    on_change: Callable[[uuid.UUID | None], Awaitable[None]] | None = None,
) -> Registry:
    policy = upstream_policy(settings)

    async def check(url: str) -> None:
        await check_url(url, policy)

    def check_connect(url: str) -> None:
        check_literal_host(parse_base_url(effective_base_url(url)).host, policy)

    return Registry(
        engine,
        keys,
        check_url=check,
        check_connect=check_connect,
        cache=LRUCache(settings.model_cache_size, settings.model_cache_ttl),
        names=LRUCache(settings.model_cache_size, settings.model_cache_ttl),
        on_change=on_change,
    )


def connect_redis(settings: Settings) -> Redis:
    """The Redis client of one process (connections are made lazily, so Redis may be down now)."""
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=10,
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
    path = settings.admin_token_path
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


async def listen_for_token_changes(
    settings: Settings, engine: AsyncEngine
) -> tuple[ChangeListener | None, TokenCache | None]:
    """On PostgreSQL: the cache of verified tokens, and the listener that keeps it true (see
    `accounts.TokenCache`). SQLite needs neither: its own token reader is cheap and exact."""
    if engine.url.get_backend_name() != "postgresql":
        return None, None
    listener = ChangeListener(engine.url, timeout=settings.database_timeout)
    cache = TokenCache(lambda: listener.listening)
    listener.start(cache.clear)
    try:
        async with asyncio.timeout(settings.database_timeout):
            await listener.wait_listening()
    except TimeoutError:
        log.warning("could not listen for token changes at start-up: every token is read from the database until then")
    return listener, cache


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
    sessions: Sessions
    metrics: Metrics
    usage: UsageRecorder
    failover: Failover
    redis: Redis | None = None
    bus: CacheBus | None = None
    chats: RunningChats = field(default_factory=RunningChats)  # for the drain at shutdown
    tracing: Tracing | None = None  # OpenTelemetry, when an OTLP endpoint is configured
    listener: ChangeListener | None = None  # PostgreSQL: token changes, for the token cache

    @classmethod
    async def start(cls, settings: Settings, worker: Worker | None = None) -> Runtime:
        """Build a process's resources; a `worker` of several finds the database migrated and
        the first admin made (by its supervisor) and shares its metrics with its siblings."""
        engine = db.create_engine(
            settings.database_url, timeout=settings.database_timeout, pool_size=settings.database_pool_size
        )
        if settings.migrate_on_start and worker is None:
            await db.upgrade(engine)
        listener, cache = await listen_for_token_changes(settings, engine)
        accounts = Accounts.for_engine(engine, cache)
        if worker is None:
            await bootstrap_admin(settings, accounts)
        supabase = supabase_verifier(settings)
        sessions = Sessions(engine)
        metrics = (
            Metrics(max_models=settings.metrics_max_models)
            if worker is None
            else SharedMetrics(worker.run_dir, worker.slot, max_models=settings.metrics_max_models)
        )
        keys = Keys.from_settings(settings)
        redis: Redis | None = None
        bus: CacheBus | None = None
        limiter: Limiter
        if settings.redis_url:
            redis = connect_redis(settings)
            bus = CacheBus(redis, prefix=settings.redis_prefix, metrics=metrics)
            registry = build_registry(settings, engine, keys, on_change=bus.publish)
            limiter = RedisLimiter(
                redis,
                settings.rate_limit_per_minute,
                settings.max_concurrent_streams,
                metrics=metrics,
                prefix=settings.redis_prefix,
            )
            breaker = Breaker(
                settings.breaker_threshold,
                settings.breaker_cooldown,
                settings.breaker_cooldown_max,
                publish=bus.publish_breaker,
            )
            bus.start(registry.invalidate, breaker.apply)
            try:
                async with asyncio.timeout(2 * settings.redis_timeout + 1):
                    await bus.wait_subscribed()
            except TimeoutError:
                log.warning("Redis did not answer at start-up: serving without it until it does")
        else:
            registry = build_registry(settings, engine, keys)
            breaker = Breaker(settings.breaker_threshold, settings.breaker_cooldown, settings.breaker_cooldown_max)
            limiter = MemoryLimiter(settings.rate_limit_per_minute, settings.max_concurrent_streams)
        upstream = UpstreamClient(settings, resolver=GuardedResolver(upstream_policy(settings)))
        await upstream.start()
        usage = UsageRecorder(engine)
        usage.start()
        runtime = cls(
            settings=settings,
            engine=engine,
            registry=registry,
            accounts=accounts,
            authenticator=Authenticator(accounts, supabase, sessions),
            limiter=limiter,
            upstream=upstream,
            supabase=supabase,
            sessions=sessions,
            metrics=metrics,
            usage=usage,
            failover=Failover(settings, registry, breaker, metrics=metrics if settings.metrics else None),
            redis=redis,
            bus=bus,
            tracing=Tracing.from_environment(),
            listener=listener,
        )
        metrics.watch(lambda: len(runtime.chats), upstream.pool_counts)
        if isinstance(metrics, SharedMetrics):
            metrics.start()
        return runtime

    async def close(self) -> None:
        await self.upstream.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # exports the last spans
        await self.usage.close()  # after the last chat, before the engine goes
        if self.supabase is not None:
            await self.supabase.aclose()
        if self.bus is not None:
            await self.bus.aclose()
        if self.listener is not None:
            await self.listener.aclose()
        if isinstance(self.limiter, RedisLimiter):
            await self.limiter.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        self.accounts.close()
        await self.engine.dispose()
        if isinstance(self.metrics, SharedMetrics):
            self.metrics.close()  # after the last chat was counted

    async def admit(self, scope: Scope) -> Principal:
        """Authenticate the request and count it against the caller's rate limit."""
        principal = await self.authenticator.authenticate(scope["headers"], scope["method"])
        await self.limiter.hit(str(principal.user_id))
        return principal

    async def model_for_chat(self, principal: Principal, model_id: uuid.UUID) -> ModelRecord:
        """The model a chat goes to; one the caller may not use does not exist for them."""
        record = await self.registry.for_chat(model_id)
        if not principal.may_use(record.user_id, record.sharing):
            raise NotFound("Model not found")
        return record

    async def model_by_ref(self, principal: Principal, ref: str) -> ModelRecord:
        """The model an OpenAI request names: by chatgate id, else by name among the models the
        caller may use (a name that several of them share is refused as ambiguous)."""
        try:
            model_id: uuid.UUID | None = uuid.UUID(ref)
        except ValueError:
            model_id = None
        if model_id is not None:
            try:
                return await self.model_for_chat(principal, model_id)
            except NotFound:
                pass  # a name that looks like a UUID
        usable = [r for r in await self.registry.named(ref) if principal.may_use(r.user_id, r.sharing)]
        if not usable:
            raise ModelNotFound(f"The model `{ref}` does not exist or you do not have access to it.", param="model")
        if len(usable) > 1:
            ids = ", ".join(str(r.id) for r in usable)
            raise AmbiguousModel(
                f"The model name `{ref}` is ambiguous: {len(usable)} models have it; use one of their ids: {ids}",
                param="model",
            )
        return await self.registry.for_chat(usable[0].id)
