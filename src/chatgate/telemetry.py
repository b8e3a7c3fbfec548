"""Request ids on every response, and the one access line per chat.

An incoming `X-Request-ID` is kept when it is sane (a front end's id, to correlate its logs with
chatgate's); otherwise chatgate makes one. The access line names what an operator asks about a
chat, never a key and never message contents.
"""

from __future__ import annotations

import logging
import re

from chatgate.api.asgi import ASGIApp, Message, Receive, Scope, Send
from chatgate.trace import ChatTrace, new_request_id

__all__ = ["RequestId", "access_fields", "incoming_request_id", "log_access"]

access_log = logging.getLogger("chatgate.access")

_HEADER = b"x-request-id"
# Printable, no spaces or quotes, at most 128 bytes: safe in a header, a log line and JSON.
_SANE = re.compile(rb"[A-Za-z0-9._:@/+=\-]{1,128}")


def incoming_request_id(scope: Scope) -> str | None:
    """The client's `X-Request-ID`, if it is sane."""
    for name, value in scope["headers"]:
        if name == _HEADER:
            return value.decode("ascii") if _SANE.fullmatch(value) else None
    return None


class RequestId:
    """Pure ASGI middleware: an `x-request-id` on every response of the wrapped app (the
    control plane and the console's files), the client's own when sane."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (incoming_request_id(scope) or new_request_id()).encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                headers.append((_HEADER, request_id))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def access_fields(trace: ChatTrace) -> dict[str, object]:
    """What the access line says of a chat."""
    return {
        "request_id": trace.request_id,
        "route": trace.endpoint,
        "user": str(trace.user_id) if trace.user_id else None,
        "model": trace.model or None,
        "status": trace.status or (499 if trace.client_gone else 500),
        "ttfb": round(trace.ttfb, 6) if trace.ttfb is not None else None,
        "duration": round(trace.duration, 6) if trace.duration is not None else None,
        "prompt_tokens": trace.prompt_tokens,
        "completion_tokens": trace.completion_tokens,
        "bytes": trace.bytes_out,
        # Upstream requests made (retries and fallbacks included), and the chatgate id of the
        # model that answered (a fallback's, when the requested model failed).
        "attempts": trace.attempts,
        "answered": str(trace.answered_id) if trace.answered_id else None,
        "client_gone": trace.client_gone,
        "error_kind": trace.error_kind,
    }


def log_access(trace: ChatTrace) -> None:
    """One INFO line per chat, at its end (nothing is formatted when INFO is off)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields = access_fields(trace)
    text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
    access_log.info("chat %s", text, extra={"fields": fields})
