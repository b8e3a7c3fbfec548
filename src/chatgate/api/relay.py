"""What both chat dialects share: find the model, open the upstream, watch for the client
leaving, and deal with a failure after the first byte the way the dialect wants."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from chatgate.api.asgi import DisconnectWatch, Receive, Scope, abort_response, parse_json, read_body
from chatgate.drain import shutting_down
from chatgate.errors import ChatgateError, UpstreamIncomplete, UpstreamProtocolError, UpstreamStatus, UpstreamTimeout
from chatgate.metrics import failure_kind
from chatgate.registry import ModelRecord
from chatgate.runtime import Runtime
from chatgate.security.crypto import mask
from chatgate.security.principal import Principal
from chatgate.trace import ChatTrace
from chatgate.upstream.client import STREAM_FAILURES, Target, chat_completions_url, stream_error
from chatgate.upstream.http11 import Response

log = logging.getLogger("chatgate.chat")

Relay = Callable[[Response], Awaitable[None]]
# What a dialect does with a failure after the response began; None leaves it incomplete
# (aborted), so that a client can tell the answer is cut short.
OnFailure = Callable[[ChatgateError], Awaitable[None]]

INCLUDE_USAGE = {"include_usage": True}


def with_usage(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` asking a streaming upstream for token counts (`stream_options.include_usage`)."""
    options = payload.get("stream_options")
    merged = {**options, **INCLUDE_USAGE} if isinstance(options, dict) else INCLUDE_USAGE
    return {**payload, "stream_options": merged}


def refuses_stream_options(exc: UpstreamStatus) -> bool:
    """Whether an upstream error says it does not take `stream_options` (older vLLM, Azure,
    Mistral and strict proxies answer 400 or 422 naming the field)."""
    message = exc.message.lower()
    return exc.status in (400, 422) and ("stream_options" in message or "stream options" in message)


async def admit_chat(runtime: Runtime, scope: Scope, receive: Receive, trace: ChatTrace) -> tuple[Principal, Any]:
    """What every chat starts with: the caller authenticated and counted, then the body as JSON."""
    principal = await runtime.admit(scope)
    trace.user_id = principal.user_id
    settings = runtime.settings
    body = parse_json(await read_body(scope, receive, settings.max_body_bytes, stall=settings.client_timeout))
    return principal, body


async def run_chat(
    runtime: Runtime,
    scope: Scope,
    receive: Receive,
    trace: ChatTrace,
    record: ModelRecord,
    payload: dict[str, Any],
    relay_for: Callable[[ModelRecord], Relay],
    *,
    accept: str = "text/event-stream",
    on_failure: OnFailure | None = None,
    ask_usage: bool = False,
    first_byte_timeout: float | None = None,
) -> None:
    """Send `payload` to the model's server (or, when it fails before the first byte, to its
    fallbacks: failover.py) and hand the open response to the relay `relay_for` makes for the
    model that answers.

    Raises `ChatgateError` while nothing has been sent; afterwards a failure is logged and handed
    to `on_failure`, or the response is left incomplete, which the server turns into an aborted
    connection. `ask_usage` adds `stream_options.include_usage` for the models that take it; a
    model that refuses it is asked again without, once, and remembered.
    `first_byte_timeout` replaces the setting for this request (a non-streamed answer's head
    comes only when the whole answer is ready).
    """
    trace.model_id = record.id
    trace.model = record.model_id
    trace.base_url = record.base_url
    stream = accept == "text/event-stream"
    first_token_timeout = runtime.settings.first_token_timeout if stream else None

    async def attempt(model: ModelRecord, deadline: float | None) -> None:
        body = payload if model is record else {**payload, "model": model.model_id}
        trace.base_url = model.base_url
        target = Target(chat_completions_url(model.base_url), model.api_key)
        relay = relay_for(model)
        timeouts = (first_byte_timeout, first_token_timeout, deadline)
        try:
            if not (ask_usage and runtime.registry.accepts_stream_options(model.id)):
                await _exchange(runtime, trace, target, orjson.dumps(body), accept, timeouts, relay)
                return
            try:
                await _exchange(runtime, trace, target, orjson.dumps(with_usage(body)), accept, timeouts, relay)
            except UpstreamStatus as exc:
                if trace.started or not refuses_stream_options(exc):
                    raise
                runtime.registry.refuses_stream_options(model.id)
                log.info(
                    "request %s: model %s refuses stream_options; retrying without (token counts unknown)",
                    trace.request_id,
                    model.id,
                )
                await _exchange(runtime, trace, target, orjson.dumps(body), accept, timeouts, relay)
        except ChatgateError as exc:
            scrub_key(exc, model.api_key)
            raise

    watch = DisconnectWatch(scope, receive)
    try:
        runtime.chats.add(watch)  # so that a shutdown can wait for it, and end it
        async with runtime.limiter.stream(str(trace.user_id)):
            await runtime.failover.run(record, attempt, trace)
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        if watch.ending:
            await _failed(scope, trace, watch, shutting_down(), on_failure)
        else:
            trace.client_gone = True
            trace.status = trace.status or 499
            log.info("request %s: client went away; upstream request closed", trace.request_id)
    except ChatgateError as exc:
        scrub_key(exc, record.api_key)
        if isinstance(exc, UpstreamStatus) and trace.upstream_ttfb is None:
            trace.upstream_answered()  # an error head is an answer too (its body read included)
        trace.error_kind = failure_kind(exc, answered=trace.upstream_ttfb is not None)
        if not trace.started and isinstance(exc, UpstreamProtocolError | UpstreamIncomplete):
            # An answer chatgate cannot relay: the caller gets a 502, the operator the reason.
            log.warning("request %s: model %s: %s", trace.request_id, record.id, exc.message)
        await _failed(scope, trace, watch, exc, on_failure)
    finally:
        watch.stop()
        runtime.chats.discard(watch)


async def _failed(
    scope: Scope, trace: ChatTrace, watch: DisconnectWatch, exc: ChatgateError, on_failure: OnFailure | None
) -> None:
    """A chat failed: raise while nothing was sent, else log it and end the response the dialect's way."""
    if not trace.started:
        raise exc
    trace.error = exc.message
    trace.status = exc.status
    outcome = "aborted" if on_failure is None else "ended with an error event"
    log.warning("request %s: stream %s after %d bytes: %s", trace.request_id, outcome, trace.bytes_out, exc.message)
    watch.stop()  # what is sent now to a client that left is dropped, not cancelled
    if on_failure is None:
        abort_response(scope)
    else:
        await on_failure(exc)


# What a streamed answer may be labelled and still be read as SSE: some servers send text/plain
# with SSE in it, some no Content-Type at all. Anything else (a JSON body, an HTML page) is not an
# event stream, and reading it as one gave an empty 200.
_READABLE_AS_SSE = (b"text/event-stream", b"text/plain")


def require_event_stream(response: Response) -> None:
    """Refuse, before the first byte, a streamed answer chatgate cannot read as SSE: one with a
    content coding (chatgate asks for identity and decodes none) or a type that is not SSE."""
    encoding = response.header(b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise UpstreamProtocolError(
            f"The model server answered with Content-Encoding {_shown(encoding)}, which chatgate does not decode"
        )
    content_type = response.header(b"content-type")
    if content_type is None:
        return
    media_type = content_type.partition(b";")[0].strip().lower()
    if media_type not in _READABLE_AS_SSE:
        raise UpstreamProtocolError(f"The model server answered {_shown(media_type)}, not an event stream")


def incomplete(*, saw_events: bool) -> UpstreamIncomplete:
    """The error for a stream that ended without [DONE] and without a finish_reason."""
    if not saw_events:
        return UpstreamIncomplete(
            "The model server's answer ended without any event (it is not an event stream, or was cut)"
        )
    return UpstreamIncomplete("The model server ended the stream before it was complete (no finish_reason, no [DONE])")


def _shown(value: bytes) -> str:
    # An upstream's header in our message and log: printable, and short.
    text = value.decode("latin-1")[:80]
    return "".join(c if c.isprintable() else "?" for c in text) or "(empty)"


def scrub_key(exc: ChatgateError, api_key: str) -> None:
    """Mask the model's key wherever an upstream echoed it in an error ("Incorrect API key
    provided: sk-…"): the caller of a shared model must not learn its owner's key."""
    if not api_key:
        return
    if api_key in exc.message:
        exc.message = exc.message.replace(api_key, mask(api_key))
    if isinstance(exc, UpstreamStatus) and api_key.encode() in exc.body:
        exc.body = exc.body.replace(api_key.encode(), mask(api_key).encode())


def _time_first_reads(response: Response, trace: ChatTrace, first_token_timeout: float | None) -> None:
    """Note when each upstream read arrives until the client has its first byte, so that the
    added time does not count the model's wait between its head and its first token, and bound
    that wait by `first_token_timeout` (a stream that stalls before its first text has failed, and
    can still fail over); then the plain read is put back: no cost per chunk after the first
    client byte."""
    read = response.next_chunk
    if first_token_timeout is not None:
        response.expect_text_by(asyncio.get_running_loop().time() + first_token_timeout)

    async def timed() -> bytes | None:
        if trace.started:
            response.next_chunk = read
            response.text_arrived()
            return await read()
        chunk = await read()
        trace.upstream_read()
        return chunk

    response.next_chunk = timed


async def _exchange(
    runtime: Runtime,
    trace: ChatTrace,
    target: Target,
    body: bytes,
    accept: str,
    timeouts: tuple[float | None, float | None, float | None],
    relay: Relay,
) -> None:
    """One upstream request. `timeouts`: the wait for the head (None: the setting), for the first
    text after it (None: unbounded), and the failover deadline (loop time) for the head."""
    first_byte_timeout, first_token_timeout, deadline = timeouts
    trace.upstream_sent()
    opening = runtime.upstream.open(
        target, body, accept=accept, first_byte_timeout=first_byte_timeout, extra_headers=trace.upstream_headers
    )
    if deadline is None:
        response = await opening
    else:
        try:
            async with asyncio.timeout_at(deadline):
                response = await opening
        except TimeoutError:
            raise UpstreamTimeout("The model server did not answer before the failover deadline") from None
    trace.upstream_answered()
    _time_first_reads(response, trace, first_token_timeout)
    try:
        await relay(response)
    except STREAM_FAILURES as exc:
        raise stream_error(exc, runtime.settings) from exc
    finally:
        response.release()
