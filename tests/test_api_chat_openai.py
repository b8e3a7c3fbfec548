"""The OpenAI shapes (api/openai_shapes.py, used by api/chat_openai.py): error shapes and model ids."""

from __future__ import annotations

import uuid

import pytest

from chatgate.api.openai_shapes import model_ids, render_error
from chatgate.errors import (
    AmbiguousModel,
    ChatgateError,
    ModelNotFound,
    RateLimited,
    Unauthorized,
    UpstreamStatus,
    UpstreamTimeout,
)
from chatgate.registry import ModelRecord


@pytest.mark.parametrize(
    ("exc", "type_", "code"),
    [
        (AmbiguousModel("m", param="model"), "invalid_request_error", "ambiguous_model"),
        (Unauthorized("m"), "authentication_error", "invalid_credentials"),
        (ModelNotFound("m", param="model"), "invalid_request_error", "model_not_found"),
        (RateLimited("m", retry_after=3), "rate_limit_error", "rate_limited"),
        (UpstreamTimeout("m"), "api_error", "upstream_timeout"),
        (ChatgateError("m"), "api_error", "internal_error"),
    ],
)
def test_errors_take_openais_shape(exc: ChatgateError, type_: str, code: str) -> None:
    assert render_error(exc) == {"error": {"message": "m", "type": type_, "param": exc.param, "code": code}}


def test_an_upstream_error_object_passes_through() -> None:
    body = b'{"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}'
    assert render_error(UpstreamStatus(400, "too long", body=body)) == {
        "error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}
    }


@pytest.mark.parametrize("body", [b"", b"plain text", b'{"detail": "x"}', b'{"error": "a string"}'])
def test_other_upstream_error_bodies_are_wrapped(body: bytes) -> None:
    error = render_error(UpstreamStatus(503, "x", body=body))["error"]
    assert (error["message"], error["type"]) == ("x", "api_error")


def record(name: str) -> ModelRecord:
    return ModelRecord(id=uuid.uuid4(), user_id=uuid.uuid4(), name=name, base_url="", model_id="m", api_key="")


def test_model_id_is_the_name_unless_it_is_shared() -> None:
    a, b1, b2 = record("a"), record("b"), record("b")
    assert model_ids([a, b1, b2]) == [("a", a), (str(b1.id), b1), (str(b2.id), b2)]
