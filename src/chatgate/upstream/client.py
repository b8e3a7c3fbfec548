"""The one upstream HTTP client: a pooled aiohttp session created in the lifespan.

aiohttp rather than httpx: on the relay's hot path it costs markedly less CPU per streamed
request (see docs/performance.md), and its resolver hook lets the SSRF guard hand the
connector exactly the addresses it checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
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
from chatgate.security.ssrf import BlockedAddress

# An upstream error body is read for its message, never relayed whole.
_MAX_ERROR_BODY = 64 * 1024


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


class UpstreamClient:
    """Opens chat requests to model servers and maps transport failures to chatgate errors."""

    def __init__(self, settings: Settings, resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        self._settings = settings
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        # sock_read covers the wait for the response head (the first-byte timeout); once the
        # head is in, the connection's read timeout is switched to the idle timeout.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.first_byte_timeout
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._settings.upstream_max_connections,
            limit_per_host=0,
            resolver=self._resolver,
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def post(
        self, target: Target, body: bytes, *, accept: str = "text/event-stream", first_byte_timeout: float | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST `body` to the target; yields a successful response, closes it on exit.
        `first_byte_timeout` replaces the setting of that name for this request.

        Raises an `UpstreamError` (or `BadRequest` for a refused address) before yielding.
        """
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        headers = {
            "Content-Type": "application/json",
            "Accept": accept,
            "Accept-Encoding": "identity",
            "User-Agent": "chatgate",
        }
        if target.api_key:
            headers["Authorization"] = "Bearer " + target.api_key
        try:
            timeout = self._timeout
            if first_byte_timeout is not None:
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=self._settings.connect_timeout, sock_read=first_byte_timeout
                )
            response = await self._session.post(
                target.url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            waited = first_byte_timeout if first_byte_timeout is not None else self._settings.first_byte_timeout
            raise UpstreamTimeout(_timeout_message(exc, self._settings, waited)) from exc
        except aiohttp.ClientConnectorError as exc:
            blocked = _blocked(exc)
            if blocked is not None:
                raise blocked from exc
            raise UpstreamUnreachable(f"The model server could not be reached ({exc.host}:{exc.port})") from exc
        except aiohttp.InvalidURL as exc:
            raise BadRequest("The model's base URL is not a valid URL", param="base_url") from exc
        except ValueError:
            # aiohttp refuses control characters in headers; only the key can carry them (rows
            # written by chatbot-ui; chatgate refuses them at write time). Never echo the value.
            raise BadRequest("The model's API key cannot be sent in an HTTP header", param="api_key") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable("The model server closed the connection before answering") from exc
        try:
            if response.status >= 400:
                body = await _error_body(response)
                raise UpstreamStatus(response.status, error_message(body) or "", body=body)
            if response.status >= 300:
                raise UpstreamProtocolError(
                    f"The model server answered a redirect ({response.status}); chatgate does not follow them"
                )
            protocol = response.connection.protocol if response.connection else None
            if protocol is not None:
                protocol.read_timeout = self._settings.idle_timeout
            yield response
        finally:
            if response.content.is_eof():
                response.release()
            else:
                # Not read to the end (client gone, error mid-stream): drop the connection so
                # the upstream stops generating.
                response.close()


def _timeout_message(exc: BaseException, settings: Settings, waited: float) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"The model server did not accept a connection within {settings.connect_timeout:g} s"
    return f"The model server sent no response within {waited:g} s"


def _blocked(exc: aiohttp.ClientConnectorError) -> BadRequest | None:
    # The SSRF guard refuses from inside the resolver; aiohttp wraps its OSError.
    if isinstance(exc.os_error, BlockedAddress):
        return BadRequest(exc.os_error.message, param="base_url")
    return None


async def _error_body(response: aiohttp.ClientResponse) -> bytes:
    try:
        async with asyncio.timeout(5):
            return await response.content.read(_MAX_ERROR_BODY)
    except (TimeoutError, aiohttp.ClientError):
        return b""


def stream_error(exc: BaseException, settings: Settings) -> UpstreamError:
    """Map a failure while reading an open stream to the error chatgate reports."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"The model server sent nothing for {settings.idle_timeout:g} s")
    return UpstreamUnreachable("The model server ended the stream before it was complete")
