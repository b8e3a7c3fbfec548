"""Model-cache invalidation and circuit-breaker state between instances, over Redis pub/sub.

A model written through one instance (or the CLI) is published on `{prefix}models`; every
instance listening drops that model from its cache, so a deleted model is refused everywhere
within milliseconds. Pub/sub delivers at most once: whenever the subscription is (re)made, after
Redis was away, the whole cache is dropped, since messages sent meanwhile were lost. The cache's
TTL stays the safety net for everything else.

Breakers (breaker.py) travel on `{prefix}breakers`: `{model} {seconds} {cooldown}` when one
opened (0 seconds: closed). A lost message costs one instance a few failures of its own before
its breaker opens too.
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
from chatgate.tasks import cancel_and_wait

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
        self.breaker_channel = prefix + "breakers"
        self._on_breaker: Callable[[uuid.UUID, float, float], None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
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

    def publish_breaker(self, model_id: uuid.UUID, seconds: float, cooldown: float) -> None:
        """Tell every instance a model's breaker opened for `seconds` (0: closed), in the
        background: a chat never waits for Redis."""
        message = f"{model_id} {seconds:g} {cooldown:g}"
        task = asyncio.get_running_loop().create_task(self._publish_breaker(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish_breaker(self, message: str) -> None:
        try:
            async with asyncio.timeout(5):
                await self._redis.publish(self.breaker_channel, message)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._metrics is not None:
                self._metrics.redis_errors.labels("publish").inc()
            log.warning("could not publish a breaker change to Redis (%s: %s)", type(exc).__name__, exc)

    def start(
        self,
        invalidate: Callable[[uuid.UUID | None], None],
        on_breaker: Callable[[uuid.UUID, float, float], None] | None = None,
    ) -> None:
        """Listen in the background, calling `invalidate(model_id or None)` for each change, and
        `on_breaker(model_id, seconds, cooldown)` for each breaker another instance opened or closed."""
        self._on_breaker = on_breaker
        self._task = asyncio.get_running_loop().create_task(self._listen(invalidate), name="chatgate-cachebus")

    async def wait_subscribed(self) -> None:
        """Wait until the subscription stands (bound it with `asyncio.timeout`)."""
        await self._subscribed.wait()

    async def _listen(self, invalidate: Callable[[uuid.UUID | None], None]) -> None:
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self.breaker_channel)
                invalidate(None)  # whatever was published while we were not listening is lost
                self._subscribed.set()
                if failing:
                    log.warning("Redis answers again: model changes from other instances are applied again")
                    failing = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        if message["channel"] in (self.breaker_channel, self.breaker_channel.encode()):
                            self._apply_breaker(message["data"])
                        else:
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

    def _apply_breaker(self, data: bytes | str) -> None:
        if self._on_breaker is None:
            return
        text = data.decode() if isinstance(data, bytes) else data
        try:
            model, seconds, cooldown = text.split(" ")
            self._on_breaker(uuid.UUID(model), float(seconds), float(cooldown))
        except ValueError:
            log.warning("ignored a malformed breaker message on %s", self.breaker_channel)

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await cancel_and_wait(self._task)
        self._task = None
