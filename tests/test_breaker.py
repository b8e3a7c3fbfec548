"""The circuit breaker's states, on a clock the test moves."""

from __future__ import annotations

import uuid

from chatgate.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, published: list[tuple[uuid.UUID, float, float]] | None = None) -> Breaker:
    publish = None if published is None else (lambda m, s, c: published.append((m, s, c)))
    return Breaker(3, 10.0, 35.0, clock=clock, publish=publish)


def test_opens_after_threshold_failures_in_a_row_and_lets_one_probe_through() -> None:
    clock, model = Clock(), uuid.uuid4()
    b = breaker(clock)
    assert not b.failed(model) and not b.failed(model)
    assert b.allow(model)
    assert b.failed(model)  # the third in a row opens it
    assert not b.allow(model)
    clock.now += 9.9
    assert not b.allow(model)
    clock.now += 0.2
    assert b.allow(model)  # the probe
    assert not b.allow(model)  # only one at a time
    b.succeeded(model)
    assert b.allow(model) and b.allow(model)


def test_a_success_resets_the_count() -> None:
    clock, model = Clock(), uuid.uuid4()
    b = breaker(clock)
    b.failed(model)
    b.failed(model)
    b.succeeded(model)
    assert not b.failed(model) and not b.failed(model)
    assert b.allow(model)


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    clock, model = Clock(), uuid.uuid4()
    b = breaker(clock)
    for _ in range(3):
        b.failed(model)
    cooldowns = []
    for _ in range(4):
        opened_at = clock.now
        while not b.allow(model):
            clock.now += 0.5
        cooldowns.append(round(clock.now - opened_at))
        assert b.failed(model)  # the probe failed: open again
    assert cooldowns == [10, 20, 35, 35]


def test_a_lost_probe_lets_another_through_after_a_cooldown() -> None:
    clock, model = Clock(), uuid.uuid4()
    b = breaker(clock)
    for _ in range(3):
        b.failed(model)
    clock.now += 10
    assert b.allow(model)  # a probe whose client left: it never reports
    clock.now += 5
    assert not b.allow(model)
    clock.now += 5
    assert b.allow(model)


def test_openings_and_closings_are_published_and_applied_elsewhere() -> None:
    clock, model = Clock(), uuid.uuid4()
    published: list[tuple[uuid.UUID, float, float]] = []
    here, there = breaker(clock, published), breaker(clock)
    for _ in range(3):
        here.failed(model)
    assert published == [(model, 10.0, 10.0)]
    there.apply(*published[-1])
    assert not there.allow(model) and there.is_open(model)
    clock.now += 10
    assert here.allow(model)
    here.succeeded(model)
    assert published[-1] == (model, 0.0, 0.0)
    there.apply(*published[-1])
    assert there.allow(model) and not there.is_open(model)


def test_threshold_zero_never_opens() -> None:
    model = uuid.uuid4()
    b = Breaker(0, 10.0, 20.0)
    for _ in range(100):
        assert not b.failed(model)
    assert b.allow(model)
