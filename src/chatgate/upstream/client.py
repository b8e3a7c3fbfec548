"""The one upstream client of a process: a keep-alive connection pool created in the lifespan.

It sits on `http11.Pool`, a hand-written HTTP/1.1 client, because a general client cost more CPU
per streamed chat than all the rest of chatgate (bench/clients.py, docs/performance.md). This
module is where every transport failure becomes a chatgate error, and where the SSRF guard
resolves each host, so that connections go only to addresses that were checked.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import orjson

from chatgate.config import DEFAULT_BASE_URL, Settings
from chatgate.errors import (
    BadRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgate.security.ssrf import BlockedAddress, GuardedResolver
from chatgate.upstream.http11 import (
    AnswerTimeout,
    BodyTooLarge,
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    FirstTextTimeout,
    IdleTimeout,
    Pool,
    ProtocolError,
    Response,
    TransportError,
    endpoint,
)

# An upstream error body is read for its message, never relayed whole.
_MAX_ERROR_BODY = 64 * 1024

# What can go wrong while an open answer is read; `stream_error` says what each means.
STREAM_FAILURES = (TransportError, IdleTimeout, AnswerTimeout, FirstTextTimeout, ProtocolError)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one chat goes: the full chat-completions URL and the key to present."""

    url: str
    api_key: str = field(repr=False)


def chat_completions_url(base_url: str) -> str:
    """`{base_url}/chat/completions`, with or without a trailing slash; empty means OpenAI."""
    return (base_url.strip() or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"


def error_message(body: bytes) -> str | None:
    """The human message of an upstream error body: OpenAI-shaped, `{"detail"}` or plain text."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text or None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            if isinstance(message, str):
                return message
            if message is not None:
                return orjson.dumps(message).decode()
        if isinstance(error, str):
            return error
        detail = parsed.get("detail")
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return orjson.dumps(detail).decode()
        message = parsed.get("message")
        if isinstance(message, str):
            return message
    return orjson.dumps(parsed).decode() if parsed not in (None, "", {}, []) else None


def _request_headers(accept: str, api_key: str, method: bytes) -> bytes:
    # Built per request (a few hundred ns): a cache keyed by the key would keep a deleted
    # model's or a replaced key in memory for the life of the process.
    if not (api_key.isascii() and api_key.isprintable()):
        # A key with control characters would inject header lines. chatgate refuses such keys
        # at write time; rows written by chatbot-ui may hold anything. Never echo the value.
        raise BadRequest("The model's API key cannot be sent in an HTTP header", param="api_key")
    # identity: chatgate relays and parses the bytes as they come and never decompresses.
    lines = f"Accept: {accept}\r\nAccept-Encoding: identity\r\nUser-Agent: chatgate\r\n"
    if method != b"GET":
        lines = "Content-Type: application/json\r\n" + lines
    if api_key:
        lines += f"Authorization: Bearer {api_key}\r\n"
    return lines.encode("ascii")


class UpstreamClient:
    """Opens chat requests to model servers and maps transport failures to chatgate errors."""

    def __init__(self, settings: Settings, resolver: GuardedResolver) -> None:
        self._settings = settings
        self._resolver = resolver
        self._pool: Pool | None = None

    async def start(self) -> None:
        settings = self._settings
        self._pool = Pool(
            self._resolve,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            keepalive_expiry=settings.keepalive_expiry,
            max_body_bytes=settings.max_response_bytes,
        )

    def pool_counts(self) -> tuple[int, int]:
        """Upstream connections open and idle (0, 0 before start-up)."""
        return self._pool.counts() if self._pool is not None else (0, 0)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await self._resolver.close()

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            return await self._resolver.resolve(host, port)
        except BlockedAddress:
            raise
        except OSError as exc:
            raise ConnectError(f"cannot resolve {host}") from exc

    async def open(
        self,
        target: Target,
        body: bytes,
        *,
        accept: str = "text/event-stream",
        first_byte_timeout: float | None = None,
        method: bytes = b"POST",
        extra_headers: bytes = b"",
    ) -> Response:
        """Send `body` (none for a GET) to the target and return the successful response, whose head is in. The
        caller must `release()` it (one not read to the end closes its connection, so the
        upstream stops generating). `first_byte_timeout` replaces the setting for this request;
        for an answer that is not an event stream it bounds the whole answer, head and body.
        `extra_headers` are more header lines, each ending CRLF (a trace's `traceparent`).

        Raises an `UpstreamError` (or `BadRequest` for a refused address) instead of answering
        with an error status.
        """
        assert self._pool is not None, "UpstreamClient.start() was not awaited"
        waited = first_byte_timeout if first_byte_timeout is not None else self._settings.first_byte_timeout
        try:
            where = endpoint(target.url)
        except ValueError:
            raise BadRequest("The model's base URL is not a valid URL", param="base_url") from None
        headers = _request_headers(accept, target.api_key, method)
        if extra_headers:
            headers += extra_headers
        # A JSON answer comes whole when it is ready: its deadline covers the body too, so a
        # server that trickles it after the head cannot hold the request past the timeout.
        whole = accept != "text/event-stream"
        try:
            response = await self._pool.request(
                target.url, headers, body, first_byte_timeout=waited, whole_answer=whole, method=method
            )
        except FirstByteTimeout:
            raise UpstreamTimeout(f"The model server sent no response within {waited:g} s") from None
        except ConnectTimeout:
            raise UpstreamTimeout(
                f"The model server did not accept a connection within {self._settings.connect_timeout:g} s"
            ) from None
        except BlockedAddress as exc:
            raise BadRequest(exc.message, param="base_url") from None
        except ConnectError:
            raise UpstreamUnreachable(f"The model server could not be reached ({where.host}:{where.port})") from None
        except TransportError:
            raise UpstreamUnreachable("The model server closed the connection before answering") from None
        except ProtocolError as exc:
            raise UpstreamProtocolError(f"The model server did not answer in HTTP/1.1: {exc}") from None
        if response.status < 300:
            return response
        try:
            if response.status >= 400:
                error_body = await _error_body(response)
                raise UpstreamStatus(
                    response.status, error_message(error_body) or "", body=error_body, headers=retry_headers(response)
                )
            raise UpstreamProtocolError(
                f"The model server answered a redirect ({response.status}); chatgate does not follow them"
            )
        finally:
            response.release()


# When to retry, as a 429 or 503 says it: OpenAI's SDKs read `retry-after-ms` first, then
# `retry-after` (seconds or an HTTP date). Only these shapes are passed on, and short ones.
_RETRY_HEADERS = (b"retry-after", b"retry-after-ms")
_RETRY_VALUE = re.compile(rb"[0-9]{1,10}(?:\.[0-9]{1,3})?|[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{4} [0-9:]{8} GMT")


def retry_headers(response: Response) -> list[tuple[bytes, bytes]]:
    """The upstream's Retry-After headers that are safe to pass on to the caller."""
    found = []
    for name in _RETRY_HEADERS:
        value = response.header(name)
        if value is not None and _RETRY_VALUE.fullmatch(value := value.strip()):
            found.append((name, value))
    return found


async def _error_body(response: Response) -> bytes:
    try:
        async with asyncio.timeout(5):
            return await response.read(_MAX_ERROR_BODY, truncate=True)
    except (TimeoutError, *STREAM_FAILURES):
        return b""


def stream_error(exc: BaseException, settings: Settings) -> UpstreamError:
    """Map a failure while reading an open stream to the error chatgate reports."""
    if isinstance(exc, IdleTimeout):
        return UpstreamTimeout(f"The model server sent nothing for {settings.idle_timeout:g} s")
    if isinstance(exc, FirstTextTimeout):
        return UpstreamTimeout(
            f"The model server sent no text within {settings.first_token_timeout:g} s of its answer's head"
        )
    if isinstance(exc, AnswerTimeout):
        return UpstreamTimeout(f"The model server did not finish its answer within {settings.completion_timeout:g} s")
    if isinstance(exc, BodyTooLarge):
        return UpstreamProtocolError(
            f"The model server's answer is larger than CHATGATE_MAX_RESPONSE_BYTES ({exc.limit} bytes)"
        )
    if isinstance(exc, ProtocolError):
        return UpstreamProtocolError(f"The model server broke HTTP mid-stream: {exc}")
    return UpstreamUnreachable("The model server ended the stream before it was complete")
