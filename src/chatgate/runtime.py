"""The long-lived resources of one server process, created in the lifespan and closed there."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.api.asgi import Scope
from chatgate.cache import LRUCache
from chatgate.config import Settings
from chatgate.errors import NotFound
from chatgate.registry import ModelRecord, Registry
from chatgate.security.crypto import KeyRing
from chatgate.security.principal import Principal
from chatgate.security.ssrf import GuardedResolver, UpstreamPolicy, check_url
from chatgate.store import db
from chatgate.upstream.client import UpstreamClient

log = logging.getLogger("chatgate")


def load_keyring(settings: Settings) -> KeyRing:
    """The key ring from `CHATGATE_SECRET_KEY`, else the embedded key file (created on first use)."""
    secret = settings.secret_key.get_secret_value()
    if secret:
        return KeyRing.from_secret(secret)
    return KeyRing.load_or_create(settings.data_dir / "chatgate.key")


def upstream_policy(settings: Settings) -> UpstreamPolicy:
    return UpstreamPolicy.from_settings(settings.allow_private_upstreams, settings.upstream_allowlist)


def build_registry(settings: Settings, engine: AsyncEngine, keyring: KeyRing) -> Registry:
    policy = upstream_policy(settings)

    async def check(url: str) -> None:
        await check_url(url, policy)

    return Registry(
        engine,
        keyring,
        check_url=check,
        cache=LRUCache(settings.model_cache_size, settings.model_cache_ttl),
    )


@dataclass
class Runtime:
    """Everything a request needs, built once per process."""

    settings: Settings
    engine: AsyncEngine
    registry: Registry
    upstream: UpstreamClient

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        engine = db.create_engine(settings.database_url)
        if settings.migrate_on_start:
            await db.upgrade(engine)
        keyring = load_keyring(settings)
        upstream = UpstreamClient(settings, resolver=GuardedResolver(upstream_policy(settings)))
        await upstream.start()
        return cls(settings, engine, build_registry(settings, engine, keyring), upstream)

    async def close(self) -> None:
        await self.upstream.close()
        await self.engine.dispose()

    async def authenticate(self, scope: Scope) -> Principal:
        return Principal(uuid.UUID(int=0), "local", is_admin=True)

    async def model_for_chat(self, principal: Principal, model_id: uuid.UUID) -> ModelRecord:
        """The model a chat goes to; one the caller may not use does not exist for them."""
        record = await self.registry.for_chat(model_id)
        if not principal.may_use(record.user_id, record.sharing):
            raise NotFound("Model not found")
        return record
