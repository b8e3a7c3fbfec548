"""The JSON shapes of the OpenAI chat API, as real servers (OpenAI, vLLM, llama.cpp) send them."""

from __future__ import annotations

import json
from typing import Any

DEFAULT_DELTAS = ("Hello", " from", " the", " fake", " upstream.")
DEFAULT_REPLY = "".join(DEFAULT_DELTAS)
DEFAULT_MODELS = ("fake-model",)
COMPLETION_ID = "chatcmpl-fake"
CREATED = 1_700_000_000
DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    """One `data:` event carrying `payload` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chunk(
    model: str,
    *,
    content: str | None = None,
    role: str | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage(prompt_tokens: int = 7, completion_tokens: int = len(DEFAULT_DELTAS)) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_chunk(model: str, counts: dict[str, int]) -> dict[str, Any]:
    """The final chunk sent when `stream_options.include_usage` is true: no choices, only usage."""
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [],
        "usage": counts,
    }


def completion(model: str, content: str, counts: dict[str, int]) -> dict[str, Any]:
    """A non-streamed `chat.completion`."""
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": counts,
    }


def model_list(ids: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": CREATED, "owned_by": "fake"} for name in ids],
    }


def error(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
