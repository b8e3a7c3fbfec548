"""The ASGI application: a thin dispatcher that sends the two chat routes down a pure-ASGI
hot path and everything else to the FastAPI control plane.

This is the one boundary where an unexpected exception is caught: it is logged with the
request id and answered 500 without internals.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from chatgate.api import chat_custom, chat_openai, openapi
from chatgate.api.asgi import BodyLimit, ClientGone, Receive, Scope, Send, abort_response, send_json
from chatgate.api.control import build_control_app
from chatgate.config import Settings
from chatgate.errors import ChatgateError, ServiceUnavailable, UpstreamError, UpstreamStatus
from chatgate.runtime import Runtime
from chatgate.store.db import UNAVAILABLE
from chatgate.telemetry import RequestId, incoming_request_id, log_access
from chatgate.trace import ChatTrace, new_request_id

if TYPE_CHECKING:
    from chatgate.workers import Worker

log = logging.getLogger("chatgate")

ChatHandler = Callable[[Scope, Receive, Send, ChatTrace], Awaitable[None]]
ErrorRenderer = Callable[[ChatgateError], Any]

UNEXPECTED = "An unexpected error occurred"


class Gateway:
    """The ASGI app. `runtime` exists between lifespan start-up and shut-down; `worker` is its
    place among the processes of `serve --workers N` (None: the only process)."""

    def __init__(self, settings: Settings, worker: Worker | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.runtime: Runtime | None = None
        self.control = build_control_app()
        # The chat routes of startup()'s table, described for /openapi.json.
        openapi.install(
            self.control, {"/api/chat/custom": chat_custom.OPENAPI, "/v1/chat/completions": chat_openai.OPENAPI}
        )
        # The chat routes bound their bodies themselves (read_body); this bounds every other route.
        self._control_app = RequestId(BodyLimit(self.control, settings.max_body_bytes, settings.client_timeout))
        self._chats: dict[str, tuple[ChatHandler, ErrorRenderer]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            chat = self._chats.get(scope["path"])
            if chat is not None:
                await self._chat(chat[0], chat[1], scope, receive, send)
                return
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._control_app(scope, receive, send)

    async def _chat(
        self, handler: ChatHandler, render: ErrorRenderer, scope: Scope, receive: Receive, send: Send
    ) -> None:
        trace = ChatTrace(request_id=incoming_request_id(scope) or new_request_id(), endpoint=scope["path"])
        tracing = self.runtime.tracing if self.runtime is not None else None
        if tracing is not None:
            tracing.start(scope, trace)
        try:
            await handler(scope, receive, send, trace)
        except ClientGone:
            trace.client_gone = True
        except ChatgateError as exc:
            trace.status, trace.error = exc.status, exc.message
            if isinstance(exc, ServiceUnavailable) and exc.message == UNAVAILABLE:
                trace.error_kind = "database"
            if exc.status >= 500 and not isinstance(exc, UpstreamError | ServiceUnavailable):
                # Ours, not the model server's (a key this instance cannot decrypt): the operator
                # must hear of it. (The store logs a database outage itself.)
                log.error("request %s: %s", trace.request_id, exc.message)
            if not trace.started:
                headers = [(b"x-request-id", trace.request_id.encode())]
                if hasattr(exc, "retry_after"):
                    headers.append((b"retry-after", str(exc.retry_after).encode()))
                if isinstance(exc, UpstreamStatus):
                    headers += exc.headers  # the upstream's Retry-After, passed on
                await send_json(send, exc.status, render(exc), headers)
            else:
                abort_response(scope)  # too late for a status: the client can only tell it is cut short
        except Exception:
            # The one broad catch: whatever escaped is a bug; the client learns nothing of it.
            log.exception("request %s: unexpected error", trace.request_id)
            trace.status, trace.error = 500, UNEXPECTED
            if not trace.started:
                await send_json(
                    send, 500, render(ChatgateError(UNEXPECTED)), [(b"x-request-id", trace.request_id.encode())]
                )
            else:
                abort_response(scope)
        finally:
            trace.finish()
            # Every authenticated chat is counted, failed ones too; the recorder never blocks.
            if self.runtime is not None:
                if trace.user_id is not None:
                    self.runtime.usage.record(trace)
                if self.settings.metrics:
                    self.runtime.metrics.observe(trace)
            log_access(trace)
            if tracing is not None:
                tracing.end(trace)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        runtime = await Runtime.start(self.settings, self.worker)
        self.runtime = runtime
        self.control.state.runtime = runtime
        self._chats = {
            "/api/chat/custom": (chat_custom.CustomChat(runtime), chat_custom.render_error),
            "/v1/chat/completions": (chat_openai.OpenAIChat(runtime), chat_openai.render_error),
        }
        # What start-up built lives as long as the process: keep the collector from walking it
        # again and again (it showed up as ~9% of a streamed chat's CPU).
        gc.collect()
        gc.freeze()

    async def drain(self) -> None:
        """Before shutting down: let running chats finish for `drain_timeout` seconds, then end
        the rest (the server keeps serving meanwhile; `/readyz` answers 503 from the start)."""
        if self.runtime is not None:
            await self.runtime.chats.drain(self.settings.drain_timeout)

    async def shutdown(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None


def create_app(settings: Settings, worker: Worker | None = None) -> Gateway:
    return Gateway(settings, worker)
