"""Circuit breaking: a model whose server failed K times in a row is skipped for a cool-down.

After `threshold` failures in a row a model's breaker opens: for `cooldown` seconds chats skip it
at the cost of a dict lookup, with no connection attempted, so a dead server (a refused port, or
a blackholed address where each connect would wait for its timeout) costs its callers nothing.
Then one request is let through as a probe: if it succeeds the breaker closes; if it fails the
breaker opens again for twice as long, up to `cooldown_max`. A probe that never reports (its
client left) lets another through after one cool-down.

With Redis, an opening (and a closing) is published on `{prefix}breakers` and every instance
applies it (`apply`), so a model one instance found dead is skipped by all of them. The failure
counts stay per instance. When Redis is away the publication is dropped with a warning and each
instance keeps breaking on its own: the chat never waits for Redis, nor fails because of it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Breaker"]

# (model, seconds it stays open, the cool-down that opened it); 0 seconds closes it.
Publish = Callable[[uuid.UUID, float, float], None]


@dataclass(slots=True)
class _State:
    failures: int = 0
    open_until: float = 0.0  # monotonic; 0: closed
    cooldown: float = 0.0  # of the last opening (the next failed probe doubles it)
    probe_at: float | None = None  # when the probe in flight was let through


class Breaker:
    """Per-model breakers of one process; `allow` is the hot-path check."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        cooldown_max: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        publish: Publish | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.cooldown_max = max(cooldown_max, cooldown)
        self._clock = clock
        self._publish = publish
        # Only models that failed since their last success are here: a healthy model costs one
        # lookup in an empty (or small) dict.
        self._states: dict[uuid.UUID, _State] = {}

    def allow(self, model_id: uuid.UUID) -> bool:
        """Whether a request may go to the model now (True for the one probe after a cool-down)."""
        state = self._states.get(model_id)
        if state is None or not state.open_until:
            return True
        now = self._clock()
        if now < state.open_until:
            return False
        if state.probe_at is not None and now - state.probe_at < state.cooldown:
            return False  # a probe is out: the others keep skipping
        state.probe_at = now
        return True

    def is_open(self, model_id: uuid.UUID) -> bool:
        """Whether the model is being skipped (open, its cool-down not over)."""
        state = self._states.get(model_id)
        return state is not None and state.open_until > self._clock()

    def succeeded(self, model_id: uuid.UUID) -> None:
        """The model answered: its breaker closes (everywhere, if it was open)."""
        if not self._states:
            return
        state = self._states.pop(model_id, None)
        if state is not None and state.open_until and self._publish is not None:
            self._publish(model_id, 0.0, 0.0)

    def failed(self, model_id: uuid.UUID) -> bool:
        """The model failed (a server failure, not the caller's); True if its breaker opened now."""
        if self.threshold <= 0:
            return False
        state = self._states.get(model_id)
        if state is None:
            state = self._states[model_id] = _State()
        state.failures += 1
        if state.probe_at is not None:  # the probe failed: open again, for longer
            cooldown = min(state.cooldown * 2, self.cooldown_max)
        elif not state.open_until and state.failures >= self.threshold:
            cooldown = self.cooldown
        else:
            return False
        self._open(model_id, state, cooldown)
        if self._publish is not None:
            self._publish(model_id, cooldown, cooldown)
        return True

    def apply(self, model_id: uuid.UUID, seconds: float, cooldown: float) -> None:
        """Another instance opened (seconds > 0) or closed (0) the model's breaker."""
        if seconds <= 0:
            self._states.pop(model_id, None)
            return
        state = self._states.get(model_id)
        if state is None:
            state = self._states[model_id] = _State(failures=self.threshold)
        self._open(model_id, state, cooldown, seconds)

    def _open(self, model_id: uuid.UUID, state: _State, cooldown: float, seconds: float | None = None) -> None:
        state.cooldown = cooldown
        state.open_until = self._clock() + (cooldown if seconds is None else seconds)
        state.probe_at = None
