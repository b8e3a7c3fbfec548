"""Failover: which models a chat tries, in which order, how often, and for how long.

A chat goes to its model; the model may name fallbacks (tried in order when it fails) or a
balancing group (members sharing its traffic by weight, the least busy first). Each model is
retried on a transient failure and skipped while its breaker is open (breaker.py). All of it
happens before the answer's first byte reaches the client: once a byte was sent, nothing is
retried (the caller would see text twice). The rules, exactly (docs/failover.md):

- retried on the same model, then failed over: connect refused or reset, no head within the
  first-byte timeout, 429, 502, 503, 504; a 429/503's Retry-After is waited for when it is at
  most `retry_after_cap` seconds, else the next model is tried at once;
- failed over at once, without a retry: any other 5xx, an answer chatgate cannot read (not an
  event stream, cut before its first text), no text within `first_token_timeout`, a model
  chatgate refuses to call (its address is not allowed);
- answered at once, nothing else tried: 400, 401, 403, 404, 413, 422 and every other 4xx (the
  request is at fault, and another model would refuse it the same way).

A model with no fallbacks and no group whose breaker never tripped pays for this with a list of
one element and a lookup in an empty dict: the registry carries the routes in the cached record,
and fallbacks are looked up only when the first model failed.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from chatgate.breaker import Breaker
from chatgate.config import Settings
from chatgate.errors import (
    BadRequest,
    ChatgateError,
    NotFound,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgate.metrics import Metrics
from chatgate.registry import ModelRecord, Registry
from chatgate.security.principal import Principal
from chatgate.trace import ChatTrace

__all__ = ["Balancer", "Failover", "Verdict", "classify", "retry_after", "shown_model"]

log = logging.getLogger("chatgate.failover")

Verdict = Literal["retry", "next", "final"]
# One upstream exchange with this model; `deadline` (loop time) bounds its wait for the head.
Attempt = Callable[[ModelRecord, float | None], Awaitable[None]]

RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def classify(exc: ChatgateError) -> Verdict:
    """What a failure before the first byte leads to (see the module's docstring)."""
    if isinstance(exc, UpstreamStatus):
        if exc.status in RETRIED_STATUSES:
            return "retry"
        return "next" if exc.status >= 500 else "final"
    if isinstance(exc, UpstreamUnreachable | UpstreamTimeout):
        return "retry"
    if isinstance(exc, UpstreamError):
        return "next"  # protocol errors, a stream cut before its first text
    if isinstance(exc, BadRequest) and exc.param in ("base_url", "api_key"):
        return "next"  # the model's own configuration is at fault, not the request
    return "final"


def retry_after(exc: ChatgateError, now: float | None = None) -> float | None:
    """Seconds a 429/503 asked to wait (`retry-after-ms`, else `retry-after` in seconds or an
    HTTP date), or None when it did not say."""
    if not isinstance(exc, UpstreamStatus):
        return None
    headers = dict(exc.headers)
    value = headers.get(b"retry-after-ms")
    if value is not None:
        return max(0.0, float(value) / 1000)
    value = headers.get(b"retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def shown_model(principal: Principal, requested: ModelRecord, answered: ModelRecord) -> str:
    """How the `X-Chatgate-Model` header names the model that answered: by its chatgate id when
    the caller could know it anyway (the model asked for, a public one, or the caller manages the
    model asked for and so its routes); else by its place (`fallback-2`, `member-1`), since an
    unlisted model's id is what lets one use it."""
    if answered.id == requested.id or answered.sharing == "public" or principal.may_manage(requested.user_id):
        return str(answered.id)
    for place, model_id in enumerate(requested.fallbacks, 1):
        if model_id == answered.id:
            return f"fallback-{place}"
    for place, (model_id, _weight) in enumerate(requested.members, 1):
        if model_id == answered.id:
            return f"member-{place}"
    return "other"


# How much busier than the least busy member (in requests in flight per unit of weight) a member
# may be and still take its turn. Pure least-in-flight skews the split towards the lighter
# weights at low concurrency (a 3:1 group split 2.3:1 with 8 chats in flight, in a simulation of
# equally fast members); with this slack the split stays within 2% of the weights from 2 to 64
# in flight, while a member whose requests pile up (a slow server) is passed over.
_SLACK = 2.0


class Balancer:
    """Spreads a group's chats over its members by smooth weighted round-robin (nginx's), among
    the members that are not much busier than the least busy one (`_SLACK`): N chats in a row
    split exactly by the weights, concurrent ones within a few percent, and a member that falls
    behind gets fewer until it catches up."""

    def __init__(self) -> None:
        self.in_flight: dict[uuid.UUID, int] = {}
        self._current: dict[tuple[uuid.UUID, uuid.UUID], int] = {}

    def order(self, group: uuid.UUID, members: tuple[tuple[uuid.UUID, int], ...]) -> list[uuid.UUID]:
        """The members in the order to try them: the chosen one first, then the others by load."""
        in_flight = self.in_flight
        load = {model_id: in_flight.get(model_id, 0) / weight for model_id, weight in members}
        least = min(load.values()) + _SLACK
        tied = [(model_id, weight) for model_id, weight in members if load[model_id] <= least]
        chosen = tied[0][0]
        if len(tied) > 1:
            current = self._current
            total = 0
            best = None
            for model_id, weight in tied:
                key = (group, model_id)
                current[key] = current.get(key, 0) + weight
                total += weight
                if best is None or current[key] > current[(group, best)]:
                    best = model_id
            assert best is not None
            current[(group, best)] -= total
            chosen = best
        rest = sorted((m for m, _w in members if m != chosen), key=lambda m: load[m])
        return [chosen, *rest]

    def started(self, model_id: uuid.UUID) -> None:
        self.in_flight[model_id] = self.in_flight.get(model_id, 0) + 1

    def ended(self, model_id: uuid.UUID) -> None:
        left = self.in_flight[model_id] - 1
        if left:
            self.in_flight[model_id] = left
        else:
            del self.in_flight[model_id]


class Failover:
    """Runs a chat's attempts: the plan (models in order), retries, backoff, deadline, breaker."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        breaker: Breaker,
        *,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self.breaker = breaker
        self.balancer = Balancer()
        self._metrics = metrics
        self._random = (rng or random.Random()).random

    async def run(self, record: ModelRecord, attempt: Attempt, trace: ChatTrace) -> ModelRecord:
        """Try the plan until a model answers; returns the model that did. Raises the failure
        to answer with (cleaned of other models' details) when none did, or at once when the
        failure is the request's fault or the answer had begun."""
        settings = self._settings
        breaker = self.breaker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.failover_deadline
        plan: list[ModelRecord | uuid.UUID] = [record]
        if record.members:
            plan = list(self.balancer.order(record.id, record.members))
        if record.fallbacks:
            plan += record.fallbacks
        last: tuple[ChatgateError, ModelRecord] | None = None
        left: ModelRecord | None = None  # the model the chat moves on from (failed or skipped)
        skipped = 0
        for entry in plan:
            model = entry if isinstance(entry, ModelRecord) else await self._target(record, entry)
            if model is None:
                continue
            if left is not None:
                self._count("chatgate_fallbacks", left)
            left = model
            for retry in range(settings.retry_attempts + 1):
                if not breaker.allow(model.id):
                    skipped += 1
                    break
                if trace.attempts and loop.time() >= deadline:
                    break
                trace.attempts += 1
                grouped = bool(record.members)
                if grouped:
                    self.balancer.started(model.id)
                try:
                    await attempt(model, deadline if trace.attempts > 1 else None)
                except ChatgateError as exc:
                    verdict = classify(exc)
                    if trace.started:
                        if verdict != "final":
                            self._failed(model, exc)
                        raise
                    if verdict == "final":
                        raise _cleaned(exc, record, model, trace.attempts) from None
                    self._failed(model, exc)
                    last = (exc, model)
                    if verdict == "next" or retry == settings.retry_attempts:
                        break
                    wait = self._backoff(exc, retry)
                    if wait is None or loop.time() + wait >= deadline:
                        break
                    self._count("chatgate_retries", model)
                    log.info(
                        "request %s: model %s failed (%s); retrying in %.3f s",
                        trace.request_id,
                        model.id,
                        exc.message,
                        wait,
                    )
                    await asyncio.sleep(wait)
                else:
                    breaker.succeeded(model.id)
                    trace.answered_id = model.id
                    return model
                finally:
                    if grouped:
                        self.balancer.ended(model.id)
        if last is None:
            if skipped:
                raise UpstreamUnreachable(
                    "The model server failed repeatedly; chatgate is not sending it requests for a while"
                )
            raise UpstreamUnreachable("The model has no model server it may use")  # every target is gone
        raise _cleaned(last[0], record, last[1], trace.attempts)

    async def _target(self, record: ModelRecord, model_id: uuid.UUID) -> ModelRecord | None:
        """A fallback or member, if it still exists and its owner still lets the model's owner use it."""
        if model_id == record.id:
            return record
        try:
            target = await self._registry.for_chat(model_id)
        except (NotFound, BadRequest):
            return None  # deleted since, or its address is no longer allowed
        if target.user_id != record.user_id and target.sharing == "private":
            return None
        return target

    def _backoff(self, exc: ChatgateError, retry: int) -> float | None:
        """Seconds to wait before retrying: what the server asked for, if at most the cap (None
        when it asked for more: the next model is tried instead); else full-jitter exponential."""
        asked = retry_after(exc)
        if asked is not None:
            return asked if asked <= self._settings.retry_after_cap else None
        backoff: float = self._settings.retry_backoff * (2**retry) * self._random()
        return backoff

    def _failed(self, model: ModelRecord, exc: ChatgateError) -> None:
        # A model chatgate refuses to call (its address) is not a failing server: no breaker.
        if isinstance(exc, UpstreamError) and self.breaker.failed(model.id):
            self._count("chatgate_breaker_openings", model)
            log.warning(
                "model %s failed %d times in a row: skipped for %g s",
                model.id,
                self.breaker.threshold,
                self.breaker.cooldown,
            )

    def _count(self, counter: str, model: ModelRecord) -> None:
        if self._metrics is not None:
            self._metrics.count_model(counter, model.model_id)


_GENERIC: tuple[tuple[type[ChatgateError], str], ...] = (
    (UpstreamTimeout, "did not answer in time"),
    (UpstreamUnreachable, "could not be reached"),
    (UpstreamIncomplete, "ended its answer before it was complete"),
    (UpstreamProtocolError, "answered in a way chatgate cannot relay"),
)


def _cleaned(exc: ChatgateError, requested: ModelRecord, failed: ModelRecord, attempts: int) -> ChatgateError:
    """The error the caller gets. One from another model than the one asked for says what went
    wrong in general words only: its message could name the other model's address, and its
    body what the other server said; a caller of a shared model learns neither."""
    if failed.id == requested.id:
        return exc
    what = next((words for cls, words in _GENERIC if isinstance(exc, cls)), None)
    if isinstance(exc, UpstreamStatus):
        what = f"answered {exc.status}"
        exc.body = b""
    exc.message = f"The model and its fallbacks failed ({attempts} attempts); the last {what or 'failed'}"
    return exc
