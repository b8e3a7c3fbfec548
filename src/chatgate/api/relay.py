"""What both chat dialects share: find the model, open the upstream, watch for the client
leaving, and turn a failure after the first byte into an aborted response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from chatgate.api.asgi import DisconnectWatch, Receive
from chatgate.errors import ChatgateError
from chatgate.registry import ModelRecord
from chatgate.runtime import Runtime
from chatgate.trace import ChatTrace
from chatgate.upstream.client import Target, chat_completions_url, stream_error

log = logging.getLogger("chatgate.chat")

Relay = Callable[[aiohttp.ClientResponse], Awaitable[None]]


async def run_chat(
    runtime: Runtime,
    receive: Receive,
    trace: ChatTrace,
    record: ModelRecord,
    payload: dict[str, Any],
    relay: Relay,
) -> None:
    """Send `payload` to the model's server and hand the open response to `relay`.

    Raises `ChatgateError` while nothing has been sent; afterwards a failure is logged and the
    response is left incomplete, which the server turns into an aborted connection.
    """
    trace.model_id = record.id
    target = Target(chat_completions_url(record.base_url), record.api_key)
    body = orjson.dumps(payload)
    watch = DisconnectWatch(receive)
    try:
        async with runtime.limiter.stream(str(trace.user_id)), runtime.upstream.post(target, body) as response:
            try:
                await relay(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise stream_error(exc, runtime.settings) from exc
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        trace.client_gone = True
        trace.status = trace.status or 499
        log.info("request %s: client went away; upstream request closed", trace.request_id)
    except ChatgateError as exc:
        if not trace.started:
            raise
        trace.error = exc.message
        trace.status = exc.status
        log.warning("request %s: stream aborted after %d bytes: %s", trace.request_id, trace.bytes_out, exc.message)
    finally:
        watch.stop()
