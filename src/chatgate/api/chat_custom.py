"""`POST /api/chat/custom`: chatbot-ui's custom-model route, byte for byte, minus its defects.

The answer is plain text: the `choices[0].delta.content` strings in order, each upstream read
flushed as one write, with the leading whitespace of the whole answer trimmed (as ai@2's
`StreamingTextResponse(OpenAIStream(...))` did). Errors before the first byte are JSON
`{"message"}` with the upstream's status; errors after it abort the response. Nothing is sent
before the first text, so until then a failing model can still fail over (failover.py).
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from typing import Any

import orjson

from chatgate.api.asgi import Receive, Scope, Send, body_writer
from chatgate.api.openapi import error_response
from chatgate.api.relay import Relay, admit_chat, incomplete, require_event_stream, run_chat
from chatgate.errors import BadRequest, ChatgateError, UpstreamProtocolError, UpstreamStatus
from chatgate.failover import shown_model
from chatgate.registry import ModelRecord, parse_id
from chatgate.runtime import Runtime
from chatgate.trace import ChatTrace
from chatgate.upstream.http11 import Response
from chatgate.upstream.sse import DONE, SSEDecoder, data_array, ends_finished, one_event_data

log = logging.getLogger("chatgate.chat")

_TEXT_TYPE = (b"content-type", b"text/plain; charset=utf-8")
# JavaScript's String.prototype.trimStart set: WhiteSpace and LineTerminator, BOM included.
_JS_WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"  # noqa: E501

_API_KEY_NOT_FOUND = "Custom API Key not found. Please set it in your profile settings."
_API_KEY_INCORRECT = "Custom API Key is incorrect. Please fix it in your profile settings."


def seed_message(exc: ChatgateError) -> str:
    """The `message` chatbot-ui's route answered with: openai-node's `"{status} {message}"`
    for upstream errors, and its two rewrites for key errors."""
    message = exc.message
    if isinstance(exc, UpstreamStatus):
        message = f"{exc.status} {message}" if message else f"{exc.status} status code (no body)"
    lowered = message.lower()
    if "api key not found" in lowered:
        return _API_KEY_NOT_FOUND
    if "incorrect api key" in lowered:
        return _API_KEY_INCORRECT
    return message


def render_error(exc: ChatgateError) -> dict[str, Any]:
    return {"message": seed_message(exc)}


class CustomChat:
    """The chat handler: `(scope, receive, send, trace)`; errors before the first byte are
    raised for the gateway to render with `render_error`."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send, trace: ChatTrace) -> None:
        runtime = self._runtime
        principal, body = await admit_chat(runtime, scope, receive, trace)
        model_ref, payload = _upstream_payload(body)
        record = await runtime.model_for_chat(principal, model_ref)
        payload.setdefault("model", record.model_id)
        # model first, as openai-node built it; dicts keep insertion order.
        payload = {"model": payload.pop("model"), **payload}

        request_id = (b"x-request-id", trace.request_id.encode())
        max_event_bytes = runtime.settings.max_event_bytes

        def relay_for(model: ModelRecord) -> Relay:
            shown = shown_model(principal, record, model).encode()
            return partial(relay, (_TEXT_TYPE, request_id, (b"x-chatgate-model", shown)))

        async def relay(headers: tuple[tuple[bytes, bytes], ...], response: Response) -> None:
            require_event_stream(response)
            decoder = SSEDecoder(max_event_bytes)
            at_start = True
            ended = False
            finished = False
            # The last two reads: where a stream without [DONE] shows that it finished.
            previous = last = b""

            def pump(chunk: bytes) -> bool:
                """A read that is one text event, written from the connection's callback; False
                for anything else (the loop below takes it), or when `send` must write."""
                nonlocal previous, last
                if write is None or not decoder.at_boundary or (data := one_event_data(chunk)) is None:
                    return False
                try:
                    content = _plain_text(orjson.loads(data))
                except orjson.JSONDecodeError:
                    return False
                if content is None:
                    return False
                if content:
                    body = content.encode()
                    if not write(body):
                        return False
                    trace.bytes_out += len(body)
                previous, last = last, chunk
                return True

            write = body_writer(scope)
            while (chunk := await response.next_chunk()) is not None:
                previous, last = last, chunk
                texts, finished = _read_texts(chunk, decoder, trace)
                if texts:
                    text = "".join(texts)
                    if at_start:
                        text = text.lstrip(_JS_WHITESPACE)
                        at_start = not text
                    if text:
                        data = text.encode()
                        if not trace.started:
                            trace.first_byte()
                            await send({"type": "http.response.start", "status": 200, "headers": headers})
                        # With [DONE] in the same read, the last text ends the body: one write fewer.
                        await send({"type": "http.response.body", "body": data, "more_body": not finished})
                        trace.bytes_out += len(data)
                        ended = finished
                        if write is not None:  # from the first text on (setting it again is free)
                            response.pump(pump)
                if finished:
                    break
            if not finished:
                # No [DONE]: an event left without its blank line may end the answer; otherwise it is
                # complete only if its last choice carried a finish_reason (else a cut: aborted).
                left = [event.data for event in decoder.flush()]
                if not (DONE in left or ends_finished(previous + last)):
                    raise incomplete(saw_events=trace.started or b"data:" in previous + last)
                tail = "".join(_texts(left, trace)[0])
                if at_start:
                    tail = tail.lstrip(_JS_WHITESPACE)
                if tail:
                    data = tail.encode()
                    if not trace.started:
                        trace.first_byte()
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    trace.bytes_out += len(data)
            if not ended:
                if not trace.started:
                    trace.first_byte()
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
            trace.status = 200

        # Ask for the token counts (usage accounting); the usage chunk has no text to relay.
        await run_chat(runtime, scope, receive, trace, record, payload, relay_for, ask_usage=True)


def _read_texts(chunk: bytes, decoder: SSEDecoder, trace: ChatTrace) -> tuple[list[str], bool]:
    """The delta texts of one upstream read, and whether it ended the stream ([DONE]).

    A read of whole one-line events (nearly every read) is parsed as one JSON array made from it
    directly (`data_array`), and a read of exactly one such event (a model server writing as it
    generates) is parsed alone, without the array (`one_event_data`); any other read, or one
    whose JSON does not parse into one value per event, goes through the SSE decoder."""
    if decoder.at_boundary:
        if (data := one_event_data(chunk)) is not None:
            try:
                return _object_texts([orjson.loads(data)], trace), False
            except orjson.JSONDecodeError:
                pass  # the decoder finds it, and says so
        elif (whole := data_array(chunk)) is not None:
            array, count, finished = whole
            try:
                objects = orjson.loads(array)
            except orjson.JSONDecodeError:
                pass
            else:
                if len(objects) == count:
                    return _object_texts(objects, trace), finished
    return _texts(decoder.feed_data(chunk), trace)


def _texts(events: list[bytes], trace: ChatTrace) -> tuple[list[str], bool]:
    """The delta texts of decoded events, and whether [DONE] was among them.

    The events' JSON is parsed in one call (as an array) rather than one call per event: most of
    a relay's parsing time was per-call overhead. An event that breaks the array, or broken
    events that the commas joined into one value, are found and reported by parsing them one by
    one."""
    finished = DONE in events
    datas = events[: events.index(DONE)] if finished else events
    if not datas:
        return [], finished
    try:
        objects = orjson.loads(b"[" + b",".join(datas) + b"]") if len(datas) > 1 else [orjson.loads(datas[0])]
    except orjson.JSONDecodeError:
        objects = []
    if len(objects) != len(datas):  # a broken event; or broken ones that, joined, made one value
        objects = [_parse_event(data) for data in datas]
    return _object_texts(objects, trace), finished


def _object_texts(objects: list[Any], trace: ChatTrace) -> list[str]:
    """The delta texts of parsed events, in order; usage taken, in-band errors raised."""
    texts = []
    for obj in objects:
        text = _plain_text(obj)
        if text is None:
            text = _delta_text(obj, trace)
        if text:
            texts.append(text)
    return texts


def _plain_text(obj: Any) -> str | None:
    """The delta text of an event of the shape nearly every event has, read without the checks
    `_delta_text` makes (an exception is cheaper than five isinstance calls when it is rare); None
    for any other event. `"usage":null`, which OpenAI puts in every chunk once usage is asked
    for, is no usage."""
    try:
        content = obj["choices"][0]["delta"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if type(content) is str and obj.get("usage") is None else None


def _parse_event(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent an event that is not JSON") from exc


def _delta_text(obj: object, trace: ChatTrace) -> str | None:
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("The model server sent an event that is not a JSON object")
    error = obj.get("error")
    if error is not None:
        raise UpstreamStatus(502, _in_band_message(error))
    if trace.response_model is None:
        trace.answered_as(obj.get("model"))
    usage = obj.get("usage")
    if usage is not None:
        trace.count_tokens(usage)
    choices = obj.get("choices")
    if not choices or not isinstance(choices, list):
        return None  # a usage-only chunk, or a keep-alive object
    first = choices[0]
    delta = first.get("delta") if isinstance(first, dict) else None
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else None


def _in_band_message(error: object) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else orjson.dumps(error).decode()


def _upstream_payload(body: object) -> tuple[uuid.UUID, dict[str, Any]]:
    """Check the seed's body and build the upstream request (the model id is resolved later)."""
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    settings = body.get("chatSettings")
    if settings is None:
        raise BadRequest("chatSettings is required", param="chatSettings")
    if not isinstance(settings, dict):
        raise BadRequest("chatSettings must be an object", param="chatSettings")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("messages is required", param="messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be an array of message objects", param="messages")
    model_ref = body.get("customModelId")
    if model_ref is None:
        raise BadRequest("customModelId is required", param="customModelId")
    if not isinstance(model_ref, str):
        raise BadRequest("customModelId must be a string", param="customModelId")
    payload: dict[str, Any] = {}
    model = settings.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise BadRequest("chatSettings.model must be a string", param="chatSettings.model")
        payload["model"] = model
    payload["messages"] = messages
    temperature = settings.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise BadRequest("chatSettings.temperature must be a number", param="chatSettings.temperature")
        payload["temperature"] = temperature
    payload["stream"] = True
    return parse_id(model_ref), payload


# The model that answered (failover.py): a fallback or a group member may answer instead.
_MODEL_HEADER = {
    "description": "The chatgate id of the model that answered, or its place (fallback-N, member-N) "
    "when the caller may not know that model's id",
    "schema": {"type": "string"},
}
_MESSAGE = {"type": "object", "properties": {"role": {"type": "string"}, "content": {}}, "required": ["role"]}

# Hand-written: this route is pure ASGI, outside FastAPI (see api/openapi.py).
OPENAPI: dict[str, Any] = {
    "post": {
        "tags": ["chat"],
        "summary": "Chat with a registered model (chatbot-ui's custom-model route)",
        "operationId": "chat_custom",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "chatSettings": {
                                "type": "object",
                                "properties": {"model": {"type": "string"}, "temperature": {"type": "number"}},
                            },
                            "messages": {"type": "array", "items": _MESSAGE},
                            "customModelId": {"type": "string", "format": "uuid"},
                        },
                        "required": ["chatSettings", "messages", "customModelId"],
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "The answer's text, streamed as it arrives",
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "headers": {"X-Chatgate-Model": _MODEL_HEADER},
            },
            "400": error_response("Malformed body, or a missing or mistyped field"),
            "401": error_response("No or bad credential"),
            "404": error_response("No such model, or not one the caller may use"),
            "408": error_response("The request body stalled"),
            "413": error_response("The request body is too large"),
            "429": error_response("Over the caller's rate or concurrent-stream limit"),
            "502": error_response("The model server failed or could not be reached"),
            "504": error_response("The model server did not answer in time"),
        },
    }
}
