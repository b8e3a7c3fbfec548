"""Model-cache invalidation between instances, over Redis pub/sub.

A model written through one instance (or the CLI) is published on `{prefix}models`; every
instance listening drops that model from its cache, so a deleted model is refused everywhere
within milliseconds. Pub/sub delivers at most once: whenever the subscription is (re)made, after
Redis was away, the whole cache is dropped, since messages sent meanwhile were lost. The cache's
TTL stays the safety net for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatgate.metrics import Metrics

__all__ = ["CacheBus"]

log = logging.getLogger("chatgate.cachebus")

_ALL = "*"


class CacheBus:
    """Publishes model changes and applies the ones other instances publish."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "chatgate:",
        metrics: Metrics | None = None,
        reconnect_delay: float = 0.5,
    ) -> None:
        self._redis = redis
        self.channel = prefix + "models"
        self._metrics = metrics
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def publish(self, model_id: uuid.UUID | None) -> None:
        """Tell every instance that `model_id` (None: every model) changed. Never raises: when
        Redis is away the other instances' TTL (and their resubscription) catch up."""
        try:
            await self._redis.publish(self.channel, str(model_id) if model_id else _ALL)
        except (RedisError, OSError) as exc:
            if self._metrics is not None:
                self._metrics.redis_errors.labels("publish").inc()
            log.warning("could not publish a model change to Redis (%s: %s)", type(exc).__name__, exc)

    def start(self, invalidate: Callable[[uuid.UUID | None], None]) -> None:
        """Listen in the background, calling `invalidate(model_id or None)` for each change."""
        self._task = asyncio.get_running_loop().create_task(self._listen(invalidate), name="chatgate-cachebus")

    async def wait_subscribed(self) -> None:
        """Wait until the subscription stands (bound it with `asyncio.timeout`)."""
        await self._subscribed.wait()

    async def _listen(self, invalidate: Callable[[uuid.UUID | None], None]) -> None:
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                invalidate(None)  # whatever was published while we were not listening is lost
                self._subscribed.set()
                if failing:
                    log.warning("Redis answers again: model changes from other instances are applied again")
                    failing = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._apply(message["data"], invalidate)
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                if self._metrics is not None:
                    self._metrics.redis_errors.labels("subscribe").inc()
                if not failing:
                    log.warning(
                        "lost the Redis subscription for model changes (%s: %s); retrying, "
                        "meanwhile cached models expire after CHATGATE_MODEL_CACHE_TTL",
                        type(exc).__name__,
                        exc,
                    )
                    failing = True
                await asyncio.sleep(self._reconnect_delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _apply(self, data: bytes | str, invalidate: Callable[[uuid.UUID | None], None]) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        if self._metrics is not None:
            self._metrics.cache_invalidations.inc()
        if text == _ALL:
            invalidate(None)
            return
        try:
            invalidate(uuid.UUID(text))
        except ValueError:
            log.warning("ignored a malformed model-change message on %s", self.channel)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
