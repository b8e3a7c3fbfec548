"""`POST /v1/chat/completions`: the OpenAI API over the registry, for the official SDKs and the
tools built on them.

`model` names a registered model by its chatgate id or its name; the row's `model_id` goes
upstream and every other field passes through untouched. A stream is relayed as the upstream's
own bytes, one write per upstream read, looking inside an event only when a cheap byte search
says it may carry what chatgate needs: the token counts (`"usage":{`), an in-band error, or
`[DONE]`. Errors have OpenAI's shape and status, so the SDKs raise their usual exceptions.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import orjson

from chatgate.api.asgi import BodyWriter, Receive, Scope, Send, body_writer
from chatgate.api.openai_shapes import render_error as render_error  # app.py renders chat errors with it
from chatgate.api.relay import admit_chat, incomplete, require_event_stream, run_chat
from chatgate.errors import BadRequest, ChatgateError
from chatgate.failover import shown_model
from chatgate.registry import ModelRecord
from chatgate.runtime import Runtime
from chatgate.security.crypto import mask
from chatgate.trace import ChatTrace
from chatgate.upstream.http11 import Response
from chatgate.upstream.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    DONE,
    EventFramer,
    decode_event,
    ends_finished,
    event_too_large,
    split_events,
)

log = logging.getLogger("chatgate.chat")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: do not buffer the stream
]
DONE_EVENT = b"data: [DONE]\n\n"

# What makes an event worth decoding, found by byte search (a few hundred ns a read, against
# about a microsecond to parse it). Inside a JSON string a quote is escaped, so these match keys
# only. A usage object is `"usage":` then `{`: `"usage":null`, which OpenAI puts in every chunk
# once usage is asked for, is skipped. [DONE] is looked for at the end of a read, where servers
# write it; one in the middle is still relayed, and the stream is not given a second one.
_USAGE_KEY = b'"usage":'
_ERROR_KEY = b'"error":'
_DONE_ENDS = (b"[DONE]\n\n", b"[DONE]\r\n\r\n", b"[DONE]\r\r")


def _worth_a_look(data: bytes) -> bool:
    return _ERROR_KEY in data or data.endswith(_DONE_ENDS) or _usage_object_at(data) >= 0


def _usage_object_at(data: bytes) -> int:
    at = data.find(_USAGE_KEY)
    while at >= 0:
        if data[at + 8 : at + 10].lstrip()[:1] == b"{":
            return at
        at = data.find(_USAGE_KEY, at + 8)
    return -1


def _first_event_to_read(data: bytes) -> int:
    """Where, in a read of whole LF-framed events, the first event worth decoding starts: the
    events before it are relayed without being cut apart (a read often holds a whole stream, and
    only its usage chunk and [DONE] at the end need a look). 0 when unsure."""
    if b"\r" in data:
        return 0
    found = [at for at in (data.find(_ERROR_KEY), data.find(b"[DONE]"), _usage_object_at(data)) if at >= 0]
    if not found:
        return 0
    boundary = data.rfind(b"\n\n", 0, min(found))
    return boundary + 2 if boundary >= 0 else 0


class OpenAIChat:
    """The chat handler: `(scope, receive, send, trace)`; errors before the first byte are
    raised for the gateway to render with `render_error`."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send, trace: ChatTrace) -> None:
        runtime = self._runtime
        principal, body = await admit_chat(runtime, scope, receive, trace)
        if not isinstance(body, dict):
            raise BadRequest("Request body must be a JSON object")
        ref = body.get("model")
        if not isinstance(ref, str) or not ref:
            raise BadRequest("model is required and must be a string", param="model")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean", param="stream")
        record = await runtime.model_by_ref(principal, ref)
        payload = {**body, "model": record.model_id}
        request_id = (b"x-request-id", trace.request_id.encode())

        def headers(model: ModelRecord) -> list[tuple[bytes, bytes]]:
            return [request_id, (b"x-chatgate-model", shown_model(principal, record, model).encode())]

        if not stream:
            await run_chat(
                runtime,
                scope,
                receive,
                trace,
                record,
                payload,
                lambda model: _JSONRelay(send, trace, headers(model)),
                accept="application/json",
                first_byte_timeout=runtime.settings.completion_timeout,
            )
            return
        options = body.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        max_event_bytes = runtime.settings.max_event_bytes

        def relay_for(model: ModelRecord) -> _StreamRelay:
            return _StreamRelay(
                send,
                body_writer(scope),
                trace,
                headers(model),
                strip_usage=not asked,
                api_key=model.api_key,
                max_event_bytes=max_event_bytes,
            )

        # Unless the client asked, ask for the token counts; the usage chunk is kept from it.
        await run_chat(
            runtime,
            scope,
            receive,
            trace,
            record,
            payload,
            relay_for,
            on_failure=partial(send_error_event, send, trace),
            ask_usage=not asked,
        )


def _commits(data: bytes) -> bool:
    """Whether these whole events begin the answer: any event but a comment or a chunk whose
    deltas carry only a role and empty content (what servers send first, before the model's
    first token). Called only until the response starts, and it stops at the first event that
    begins the answer: an event without `"role"` is decided by a byte search, a role chunk by
    one parse (see docs/failover.md for what this costs)."""
    if b"data:" not in data:
        return False
    if b"\r" in data:
        return any(_event_commits(raw) for raw in split_events(data))
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\n\n", start)
        end = size if end < 0 else end + 2
        if _event_commits(data[start:end]):
            return True
        start = end
    return False


def _event_commits(raw: bytes) -> bool:
    if b'"role"' not in raw:
        return b"data:" in raw
    if raw.startswith(b"data:") and raw.count(b"\n") <= 2:  # one `data:` line: what servers send
        return not _empty_start(raw[5:].strip())
    return any(not _empty_start(event.data) for event in decode_event(raw))


_EMPTY_DELTA_KEYS = frozenset({"role", "content", "refusal"})


def _empty_start(data: bytes) -> bool:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices or not isinstance(choices, list) or "error" in chunk or isinstance(chunk.get("usage"), dict):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") is not None:
            return False
        if not _EMPTY_DELTA_KEYS.issuperset(delta) or delta.get("content") or delta.get("refusal"):
            return False
    return True


def _has_done(data: bytes) -> bool:
    return b"[DONE]" in data and any(event.data == DONE for raw in split_events(data) for event in decode_event(raw))


class _JSONRelay:
    """A non-streamed answer: the upstream's JSON body as it came, its `usage` counted."""

    __slots__ = ("_headers", "_send", "_trace")

    def __init__(self, send: Send, trace: ChatTrace, headers: list[tuple[bytes, bytes]]) -> None:
        self._send = send
        self._trace = trace
        self._headers = headers

    async def __call__(self, response: Response) -> None:
        body = await response.read()
        trace = self._trace
        if _USAGE_KEY in body:
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                answer = None
            if isinstance(answer, dict):
                trace.count_tokens(answer.get("usage"))
                trace.answered_as(answer.get("model"))
        content_type = response.header(b"content-type") or b"application/json"
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *self._headers]
        trace.first_byte()
        await self._send({"type": "http.response.start", "status": response.status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
        trace.bytes_out += len(body)
        trace.status = response.status


class _StreamRelay:
    """A streamed answer: the upstream's events as they arrive, ending with `data: [DONE]`; a
    stream that ends without [DONE] and without a finish_reason is a cut, ended with an error event."""

    __slots__ = (
        "_errored",
        "_headers",
        "_key",
        "_masked",
        "_max_event_bytes",
        "_send",
        "_strip_usage",
        "_trace",
        "_write",
    )

    def __init__(
        self,
        send: Send,
        write: BodyWriter | None,
        trace: ChatTrace,
        headers: list[tuple[bytes, bytes]],
        *,
        strip_usage: bool,
        api_key: str = "",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self._send = send
        self._write = write  # the server's synchronous writer (api/asgi.py), if it has one
        self._trace = trace
        self._headers = headers
        self._strip_usage = strip_usage
        # The model's key as it would appear inside a JSON string, and what replaces it in an
        # event that echoes it (an in-band error quoting the request's Authorization).
        self._key = orjson.dumps(api_key)[1:-1] if api_key else b""
        self._masked = orjson.dumps(mask(api_key))[1:-1] if api_key else b""
        self._max_event_bytes = max_event_bytes
        self._errored = False

    async def __call__(self, response: Response) -> None:
        require_event_stream(response)
        send, trace = self._send, self._trace
        framer = EventFramer(self._max_event_bytes)
        done = False
        # The last two reads sent: where a stream without [DONE] shows that it finished.
        previous = last = b""
        # What came before the first event with something in it (comments, lines that are not SSE
        # at all, the role-only first chunk): sent with that event, so that an answer without
        # events is a 502, not an empty 200, and so that until the answer's first content
        # nothing has reached the client and a failing model can still fail over.
        early: list[bytes] = []
        early_size = 0
        write = self._write

        def pump(chunk: bytes) -> bool:
            """A read of whole events with nothing to look into, written from the connection's
            callback; False for anything else (the loop below takes it), or when `send` must write."""
            nonlocal previous, last
            if write is None or not framer.passes_whole(chunk) or _worth_a_look(chunk) or not write(chunk):
                return False
            trace.bytes_out += len(chunk)
            previous, last = last, chunk
            return True

        while (chunk := await response.next_chunk()) is not None:
            data = framer.feed(chunk)
            if data and _worth_a_look(data):
                data, done = self._look_into(data)
            if data:
                if not trace.started:
                    if not _commits(data):
                        early.append(data)
                        early_size += len(data)
                        if early_size > self._max_event_bytes:
                            raise event_too_large(self._max_event_bytes)
                        continue
                    if early:
                        data = b"".join([*early, data])
                    await self._start()
                await send({"type": "http.response.body", "body": data, "more_body": True})
                trace.bytes_out += len(data)
                previous, last = last, data
                if write is not None:  # once the answer has begun (setting it again is free)
                    response.pump(pump)
            if done:
                break
        tail = b""
        if not done:
            # A clean end without [DONE] (some servers), perhaps with an unterminated last event:
            # complete only if its last choice carried a finish_reason, else a cut (an error event
            # follows). After an in-band error event the stream has ended: no [DONE], no second error.
            held = framer.flush()
            if held:
                held, done = self._look_into(held + b"\n\n")
            ended = done or self._errored or _has_done(last)
            if not (ended or ends_finished(previous + last + held)):
                raise incomplete(saw_events=trace.started or b"data:" in held)
            if not ended:
                held += DONE_EVENT
            tail = held
        if not trace.started:
            await self._start()
        await send({"type": "http.response.body", "body": tail})
        trace.bytes_out += len(tail)
        trace.status = trace.status or 200

    async def _start(self) -> None:
        self._trace.first_byte()
        await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + self._headers})

    def _look_into(self, data: bytes) -> tuple[bytes, bool]:
        """Count tokens and note errors in these whole events; drop the usage chunk from a client
        that did not ask for it, and anything after [DONE]; mask the model's key in an event that
        echoes it. Returns the bytes to send and whether [DONE] was among them."""
        skip = _first_event_to_read(data)
        kept: list[bytes] = [data[:skip]] if skip else []
        changed = False
        key = self._key
        for raw in split_events(data[skip:] if skip else data):
            if not _worth_a_look(raw):
                kept.append(raw)
                continue
            if key and key in raw:
                raw = raw.replace(key, self._masked)
                changed = True
            keep = True
            for event in decode_event(raw):
                if event.data == DONE:
                    kept.append(raw)
                    return b"".join(kept), True
                keep = self._note(event.data) and keep
            if keep:
                kept.append(raw)
            else:
                changed = True
        return (b"".join(kept) if changed else data), False

    def _note(self, data: bytes) -> bool:
        """Take what chatgate needs from one event's data; False if the event is not to be sent."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True  # not ours to judge: the client's SDK will
        if not isinstance(chunk, dict):
            return True
        trace = self._trace
        if trace.response_model is None:
            trace.answered_as(chunk.get("model"))
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            self._errored = True
            trace.status = 502
            trace.error = message if isinstance(message, str) else orjson.dumps(error).decode()
            log.warning("request %s: the model server sent an error event: %s", trace.request_id, trace.error)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            trace.count_tokens(usage)
            if self._strip_usage and not chunk.get("choices"):
                return False
        return True


async def send_error_event(send: Send, trace: ChatTrace, exc: ChatgateError) -> None:
    """A failure after the stream began: an error event, then the end of the stream."""
    event = b"data: " + orjson.dumps(render_error(exc)) + b"\n\n"
    await send({"type": "http.response.body", "body": event})
    trace.bytes_out += len(event)


# The model that answered (failover.py): a fallback or a group member may answer instead.
_MODEL_HEADER = {
    "description": "The chatgate id of the model that answered, or its place (fallback-N, member-N) "
    "when the caller may not know that model's id",
    "schema": {"type": "string"},
}
_MESSAGE = {"type": "object", "properties": {"role": {"type": "string"}, "content": {}}, "required": ["role"]}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


# Hand-written: this route is pure ASGI, outside FastAPI (see api/openapi.py).
OPENAPI: dict[str, Any] = {
    "post": {
        "tags": ["openai"],
        "summary": "Chat with a registered model (OpenAI's chat completions API)",
        "operationId": "chat_completions",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "model": {"type": "string", "description": "A model's id or name, as /v1/models lists"},
                            "messages": {"type": "array", "items": _MESSAGE},
                            "stream": {"type": "boolean"},
                        },
                        "required": ["model"],
                        "additionalProperties": True,
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "A chat.completion, or with stream=true chat.completion.chunk events then [DONE]",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                "headers": {"X-Chatgate-Model": _MODEL_HEADER},
            },
            "400": _error("Malformed body, or an ambiguous model name"),
            "401": _error("No or bad credential"),
            "404": _error("No such model, or not one the caller may use"),
            "408": _error("The request body stalled"),
            "413": _error("The request body is too large"),
            "429": _error("Over the caller's rate or concurrent-stream limit"),
            "502": _error("The model server failed or could not be reached"),
            "504": _error("The model server did not answer in time"),
        },
    }
}
