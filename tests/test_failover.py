"""Failover's pure parts: what a failure leads to, Retry-After, balancing, the model header."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from email.utils import formatdate

import pytest

from chatgate.errors import (
    BadRequest,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgate.failover import Balancer, classify, retry_after, shown_model
from chatgate.registry import ModelRecord
from chatgate.security.principal import Principal


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (UpstreamUnreachable("refused"), "retry"),
        (UpstreamTimeout("no head"), "retry"),
        (UpstreamStatus(429, "slow down"), "retry"),
        (UpstreamStatus(502, ""), "retry"),
        (UpstreamStatus(503, ""), "retry"),
        (UpstreamStatus(504, ""), "retry"),
        (UpstreamStatus(500, ""), "next"),
        (UpstreamProtocolError("html"), "next"),
        (UpstreamIncomplete("cut"), "next"),
        (BadRequest("blocked", param="base_url"), "next"),
        (UpstreamStatus(400, ""), "final"),
        (UpstreamStatus(401, ""), "final"),
        (UpstreamStatus(403, ""), "final"),
        (UpstreamStatus(404, ""), "final"),
        (UpstreamStatus(413, ""), "final"),
        (UpstreamStatus(422, ""), "final"),
        (BadRequest("bad body"), "final"),
    ],
)
def test_classify(exc: Exception, verdict: str) -> None:
    assert classify(exc) == verdict  # type: ignore[arg-type]


def test_retry_after_reads_ms_seconds_and_dates() -> None:
    assert retry_after(UpstreamStatus(429, "", headers=[(b"retry-after-ms", b"1500")])) == 1.5
    assert retry_after(UpstreamStatus(429, "", headers=[(b"retry-after", b"3")])) == 3.0
    now = 1_800_000_000.0
    date = formatdate(now + 7, usegmt=True).encode()
    assert retry_after(UpstreamStatus(503, "", headers=[(b"retry-after", date)]), now) == pytest.approx(7, abs=1)
    assert retry_after(UpstreamStatus(503, "")) is None
    assert retry_after(UpstreamTimeout("x")) is None


def test_sequential_chats_split_exactly_by_weight() -> None:
    balancer, group = Balancer(), uuid.uuid4()
    a, b = uuid.uuid4(), uuid.uuid4()
    chosen = Counter(balancer.order(group, ((a, 3), (b, 1)))[0] for _ in range(1000))
    assert chosen == {a: 750, b: 250}


def test_a_member_whose_requests_pile_up_is_passed_over() -> None:
    balancer, group = Balancer(), uuid.uuid4()
    a, b = uuid.uuid4(), uuid.uuid4()
    for _ in range(10):
        balancer.started(a)  # a slow server: its requests pile up
    assert [balancer.order(group, ((a, 2), (b, 1)))[0] for _ in range(5)] == [b] * 5  # 5 per weight against 0
    for _ in range(10):
        balancer.started(b)
    assert balancer.order(group, ((a, 2), (b, 1)))[0] == a  # 5 against 10
    for _ in range(10):
        balancer.ended(a)
        balancer.ended(b)
    assert balancer.in_flight == {}


def test_concurrent_load_splits_close_to_the_weights() -> None:
    rng = random.Random(12)
    balancer, group = Balancer(), uuid.uuid4()
    a, b = uuid.uuid4(), uuid.uuid4()
    running: list[uuid.UUID] = []
    chosen: Counter[uuid.UUID] = Counter()
    for _ in range(10_000):
        while running and (len(running) >= 8 or rng.random() < 0.5):
            balancer.ended(running.pop(rng.randrange(len(running))))
        pick = balancer.order(group, ((a, 3), (b, 1)))[0]
        balancer.started(pick)
        running.append(pick)
        chosen[pick] += 1
    assert chosen[a] / chosen[b] == pytest.approx(3, rel=0.05)


def _record(owner: uuid.UUID, sharing: str = "private", **routes: object) -> ModelRecord:
    return ModelRecord(uuid.uuid4(), owner, "m", "http://x/v1", "m", "", sharing=sharing, **routes)  # type: ignore[arg-type]


def test_the_model_header_names_a_hidden_fallback_by_its_place() -> None:
    owner, caller = uuid.uuid4(), uuid.uuid4()
    hidden, public = _record(owner), _record(owner, "public")
    shared = _record(owner, "public", fallbacks=(public.id, hidden.id))
    assert shown_model(Principal(caller), shared, shared) == str(shared.id)
    assert shown_model(Principal(caller), shared, public) == str(public.id)
    assert shown_model(Principal(caller), shared, hidden) == "fallback-2"
    assert shown_model(Principal(owner), shared, hidden) == str(hidden.id)
    group = _record(owner, "public", members=((hidden.id, 1),))
    assert shown_model(Principal(caller), group, hidden) == "member-1"
