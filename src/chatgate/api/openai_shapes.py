"""The OpenAI API's shapes that both planes answer with: error objects and model objects.

Shared by the chat hot path (`chat_openai.py`) and the control plane's `/v1/models` and error
handlers, so that neither imports the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson

from chatgate.errors import ChatgateError, UpstreamStatus
from chatgate.registry import ModelRecord

__all__ = ["error_type", "model_ids", "model_object", "render_error"]


def error_type(exc: ChatgateError) -> str:
    """OpenAI's error `type` for a status (the SDKs pick their exception class by status)."""
    if exc.status >= 500:
        return "api_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error"
    )


def render_error(exc: ChatgateError) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`; an upstream's own OpenAI-shaped error
    object is passed through as it came."""
    if isinstance(exc, UpstreamStatus) and exc.body:
        try:
            upstream = orjson.loads(exc.body)
        except orjson.JSONDecodeError:
            upstream = None
        if isinstance(upstream, dict) and isinstance(upstream.get("error"), dict):
            return {"error": upstream["error"]}
    return {"error": {"message": exc.message, "type": error_type(exc), "param": exc.param, "code": exc.code}}


def model_ids(records: Iterable[ModelRecord]) -> list[tuple[str, ModelRecord]]:
    """The `id` each model has in `/v1/models`: its name when no other of `records` (the models
    the caller may use) has the same name, else its chatgate id. Either is accepted as `model`."""
    records = list(records)
    names = Counter(record.name for record in records)
    return [(record.name if names[record.name] == 1 else str(record.id), record) for record in records]


def model_object(model_id: str, record: ModelRecord) -> dict[str, Any]:
    """A model as `/v1/models` lists it (OpenAI's fields, plus its chatgate id and name)."""
    created = int(record.created_at.timestamp()) if record.created_at else 0
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "chatgate",
        "name": record.name,
        "chatgate_id": str(record.id),
    }
