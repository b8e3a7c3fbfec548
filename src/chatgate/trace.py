"""What one chat did, gathered on the way and recorded once at the end (usage accounting)."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_PROCESS = os.urandom(8).hex()
_SEQUENCE = itertools.count(1)


def _new_process() -> None:
    # A forked worker (`serve --workers`) must not repeat its parent's, or a sibling's, ids.
    global _PROCESS, _SEQUENCE
    _PROCESS = os.urandom(8).hex()
    _SEQUENCE = itertools.count(1)


os.register_at_fork(after_in_child=_new_process)


def new_request_id() -> str:
    """Unique across processes and restarts (a random per-process prefix and a counter), without
    a system call per request; a request id names a request, it guards nothing."""
    return f"{_PROCESS}{next(_SEQUENCE):016x}"


@dataclass(slots=True)
class ChatTrace:
    """Figures of one chat request; `first_byte()` marks the response as started."""

    request_id: str = field(default_factory=new_request_id)
    endpoint: str = ""
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)
    model_id: uuid.UUID | None = None
    model: str = ""  # the upstream model name (`gen_ai.request.model`), once the model is known
    response_model: str | None = None  # the name the model server answered with (`gen_ai.response.model`)
    base_url: str = ""
    user_id: uuid.UUID | None = None
    status: int = 0
    ttfb: float | None = None
    duration: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    bytes_out: int = 0
    client_gone: bool = False
    error: str | None = None
    error_kind: str | None = None  # an upstream failure: connect, timeout, status, cut, protocol
    # Seconds from t0 to sending the upstream request, and from then to the upstream's head:
    # with `ttfb`, what chatgate itself added before the first client byte.
    upstream_at: float | None = None
    upstream_ttfb: float | None = None
    # Seconds from t0 to the last upstream read before the first client byte (streams only).
    upstream_read_at: float | None = None
    # Upstream requests made (retries and fallbacks included), and the model that answered.
    attempts: int = 0
    answered_id: uuid.UUID | None = None
    # Tracing (off unless configured): the chat's span, and the header lines that carry it upstream.
    span: Any = None
    upstream_headers: bytes = b""

    @property
    def started(self) -> bool:
        return self.ttfb is not None

    def first_byte(self) -> None:
        self.ttfb = time.perf_counter() - self.t0

    def upstream_sent(self) -> None:
        self.upstream_at = time.perf_counter() - self.t0

    def upstream_answered(self) -> None:
        if self.upstream_at is not None:
            self.upstream_ttfb = time.perf_counter() - self.t0 - self.upstream_at

    def upstream_read(self) -> None:
        self.upstream_read_at = time.perf_counter() - self.t0

    @property
    def added(self) -> float | None:
        """chatgate's own time before the first client byte: arrival to upstream request, plus
        the upstream read that made the first client byte (else the upstream's head) to that
        byte; None unless the upstream answered and the client got a byte."""
        if self.ttfb is None or self.upstream_at is None or self.upstream_ttfb is None:
            return None
        arrived = self.upstream_read_at
        if arrived is None:
            arrived = self.upstream_at + self.upstream_ttfb
        return self.upstream_at + max(0.0, self.ttfb - arrived)

    def finish(self) -> None:
        self.duration = time.perf_counter() - self.t0

    def answered_as(self, name: object) -> None:
        """Keep the model name of the server's answer (its `model` field), if it is a sane one."""
        if isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable():
            self.response_model = name

    def count_tokens(self, usage: object) -> None:
        """Take the token counts from an upstream `usage` object; what is missing stays unknown."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            self.prompt_tokens = prompt
        if isinstance(completion, int) and not isinstance(completion, bool):
            self.completion_tokens = completion
