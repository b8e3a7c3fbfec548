"""The errors chatgate answers with, each carrying its HTTP status.

ChatgateError
 ├── ClientError                 the caller must change something
 │    ├── BadRequest             400: malformed body, missing or mistyped field
 │    │    └── AmbiguousModel     400: a model name that several usable models share
 │    ├── Unauthorized           401: missing or wrong credential
 │    ├── Forbidden              403: a credential used where it is not valid (cross-origin cookie)
 │    ├── NotFound               404: no such thing, or not yours
 │    │    └── ModelNotFound      404: no model by that id or name that the caller may use
 │    ├── RequestTimeout         408: the request body stalled
 │    ├── PayloadTooLarge        413
 │    └── RateLimited            429, with Retry-After
 ├── UpstreamError               the model server failed us
 │    ├── UpstreamStatus         the upstream's own HTTP error, status passed through
 │    ├── UpstreamUnreachable    502: connect failed, connection reset before an answer
 │    ├── UpstreamProtocolError  502: the answer was not what an OpenAI server sends
 │    ├── UpstreamIncomplete     502: the stream ended without finish_reason or [DONE] (a cut)
 │    └── UpstreamTimeout        504: no first byte, or idle too long
 └── ServiceUnavailable          503: our own database is down
"""

from __future__ import annotations

from typing import Any


class ChatgateError(Exception):
    """Base of every error chatgate renders; `status` is the HTTP status to answer with."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ClientError(ChatgateError):
    status = 400
    code = "invalid_request"


class BadRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    code = "invalid_credentials"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"
    type = "permission_error"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AmbiguousModel(BadRequest):
    code = "ambiguous_model"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(ChatgateError):
    status = 502
    code = "upstream_error"


class UpstreamStatus(UpstreamError):
    """The upstream answered an HTTP error; its status and message are passed through."""

    def __init__(
        self, status: int, message: str, *, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        # Response headers passed on to the caller (Retry-After), already sanitised.
        self.headers = headers or []


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamIncomplete(UpstreamError):
    """The stream ended cleanly at the HTTP level but not as a complete answer: no `[DONE]` and no
    `finish_reason` on its last choice (a server that died mid-answer on a close-delimited body)."""

    code = "upstream_incomplete"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(ChatgateError):
    status = 503
    code = "service_unavailable"


class ValidationFailed(ClientError):
    """A body that does not fit the schema; each error names the field and the limit."""

    status = 422
    code = "validation_failed"

    def __init__(self, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message, param=errors[0]["field"] if errors else None)
        self.errors = errors

    @classmethod
    def from_pydantic(cls, exc: Any) -> ValidationFailed:
        errors = []
        for err in exc.errors():
            loc = list(err["loc"])
            if len(loc) > 1 and loc[0] == "body":
                loc = loc[1:]  # FastAPI's location prefix: the field is what the user named
            where = ".".join(str(part) for part in loc) or "body"
            errors.append({"field": where, "message": err["msg"]})
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return cls(f"Invalid request: {summary}", errors)
