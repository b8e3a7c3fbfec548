"""The model check: can chatgate reach a model's server, does it know the model, does it answer?

One function, `check_model`, serves `chatgate models check ID`, `POST /api/models/{id}/check` and
the web console's Test button, so that all three say the same thing in the same words. It goes
through chatgate's own upstream client, so the SSRF guard and the error messages are the ones a
chat meets.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from chatgate.config import DEFAULT_BASE_URL, Settings
from chatgate.errors import ChatgateError, UpstreamProtocolError, UpstreamStatus
from chatgate.registry import ModelRecord
from chatgate.security.crypto import mask
from chatgate.upstream.client import STREAM_FAILURES, Target, UpstreamClient, chat_completions_url, stream_error

# A model list or a one-token answer is small; anything longer is cut (and so not valid JSON).
_MAX_BODY = 1024 * 1024


class Verdict(StrEnum):
    OK = "ok"  # the model answered, and its server lists it
    WARNING = "warning"  # the model answered, but its server's list lacks it or failed
    FAILED = "failed"  # the model did not answer


@dataclass(frozen=True, slots=True)
class Step:
    """One request of the check: how long it took, and the error when it failed."""

    latency: float
    error: str | None = None
    status: int | None = None  # chatgate's status for the error, as the API would answer

    @property
    def ok(self) -> bool:
        return self.error is None

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "latency_ms": round(self.latency * 1000, 1),
            "error": self.error,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    model_id: str  # the id the upstream is asked for
    models: Step  # GET {base_url}/models
    listed: bool | None  # whether that list holds `model_id`; None when the list failed
    chat: Step  # a one-token chat

    @property
    def verdict(self) -> Verdict:
        if not self.chat.ok:
            return Verdict.FAILED
        return Verdict.OK if self.listed else Verdict.WARNING

    def public(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "model_id": self.model_id,
            "models": {**self.models.public(), "listed": self.listed},
            "chat": self.chat.public(),
        }


def models_url(base_url: str) -> str:
    return (base_url.strip() or DEFAULT_BASE_URL).rstrip("/") + "/models"


async def check_model(
    upstream: UpstreamClient, settings: Settings, record: ModelRecord, *, wait: float = 30.0
) -> CheckResult:
    """Ask the model's server for its model list, then for a one-token chat; never raises a
    `ChatgateError` (each step's failure is in the result, the model's key masked)."""
    key = record.api_key
    started = time.perf_counter()
    listed: bool | None = None
    try:
        body = await _fetch(upstream, settings, Target(models_url(record.base_url), key), b"", b"GET", wait)
        listed = record.model_id in _model_ids(body)
        models = Step(time.perf_counter() - started)
    except ChatgateError as exc:
        models = _failed(exc, key, time.perf_counter() - started)

    payload = {
        "model": record.model_id,
        "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 1,
        "stream": False,
    }
    started = time.perf_counter()
    try:
        target = Target(chat_completions_url(record.base_url), key)
        answer = await _fetch(upstream, settings, target, orjson.dumps(payload), b"POST", wait)
        _completion(answer)
        chat = Step(time.perf_counter() - started)
    except ChatgateError as exc:
        chat = _failed(exc, key, time.perf_counter() - started)
    return CheckResult(record.model_id, models, listed, chat)


async def _fetch(
    upstream: UpstreamClient, settings: Settings, target: Target, body: bytes, method: bytes, wait: float
) -> bytes:
    response = await upstream.open(target, body, accept="application/json", first_byte_timeout=wait, method=method)
    try:
        async with asyncio.timeout(wait):
            return await response.read(_MAX_BODY)
    except TimeoutError:
        raise UpstreamProtocolError(f"The model server did not finish its answer within {wait:g} s") from None
    except STREAM_FAILURES as exc:
        raise stream_error(exc, settings) from exc
    finally:
        response.release()


def _json(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"The model server's {what} is not JSON") from None


def _model_ids(body: bytes) -> set[str]:
    """The ids of an OpenAI model list (`{"data": [{"id"}]}`; Ollama's `{"models"}` too)."""
    parsed = _json(body, "model list")
    entries = parsed.get("data", parsed.get("models")) if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise UpstreamProtocolError("The model server's model list has no `data` array")
    ids: set[str] = set()
    for entry in entries:
        if isinstance(entry, dict):
            ids.update(value for k in ("id", "name", "model") if isinstance(value := entry.get(k), str))
    return ids


def _completion(body: bytes) -> None:
    parsed = _json(body, "chat answer")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict | str):
        # Some servers answer 200 with an error object.
        error = parsed["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamProtocolError(f"The model server answered with an error: {message}")
    if not (isinstance(parsed, dict) and isinstance(parsed.get("choices"), list)):
        raise UpstreamProtocolError("The model server's chat answer has no `choices`")


def _failed(exc: ChatgateError, key: str, latency: float) -> Step:
    message = exc.message
    if isinstance(exc, UpstreamStatus):
        message = f"HTTP {exc.status}: {message}" if message else f"HTTP {exc.status}"
    if key and key in message:
        # Upstreams echo a wrong key ("Incorrect API key provided: sk-…"): never show it whole.
        message = message.replace(key, mask(key))
    return Step(latency, message, exc.status)
