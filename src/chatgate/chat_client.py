"""The client side of `chatgate chat`: a running chatgate's OpenAI API over HTTP.

httpx rather than the openai SDK: the SDK adds retries and its own exception vocabulary, and
all this needs is one streamed POST and one GET, read as SSE line by line. Every failure
becomes a `ChatFailed` whose message is plain words for a person at a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


class ChatFailed(Exception):
    """Why a chat (or listing the models) failed, in words for the person at the terminal."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code  # the exit status: 2 for a usage mistake, 1 for a failure


@dataclass
class Answer:
    """One answer as it streams in: its text, and the figures of the status line."""

    model: str
    text: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter() of the first text
    ended: float | None = None
    chunks: int = 0  # text deltas: the token count when the server does not report one
    completion_tokens: int | None = None
    stopped: bool = False  # the person stopped it (Ctrl-C)

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    def status_line(self) -> str:
        parts = [self.model, f"{self.tokens} tokens"]
        if self.first_token is not None:
            parts.append(f"first token {self.first_token - self.started:.2f} s")
            end = self.ended if self.ended is not None else time.perf_counter()
            if end > self.first_token and self.tokens > 1:
                parts.append(f"{(self.tokens - 1) / (end - self.first_token):.1f} tokens/s")
        if self.stopped:
            parts.append("stopped")
        return " · ".join(parts)


class ChatClient:
    """Talks to one chatgate server with one token."""

    def __init__(self, url: str, token: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        # No read timeout: an answer may think for minutes; chatgate bounds the upstream's silence.
        timeout = httpx.Timeout(connect_timeout, read=None)
        headers = {"Authorization": f"Bearer {token}", "User-Agent": "chatgate-chat"}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[dict[str, Any]]:
        """The models the token may use, as `/v1/models` lists them (`id` is what to ask for)."""
        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise ChatFailed(self._error(response.status_code, response.content))
        data = response.json().get("data")
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def stream(self, answer: Answer, payload: dict[str, Any]) -> Generator[str, None, None]:
        """POST a streamed chat and yield its text as it arrives, filling in `answer`. Closing
        the iterator early (Ctrl-C) closes the connection, and so chatgate stops the upstream."""
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ChatFailed(self._error(response.status_code, response.read()))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # event names, comments (": ping"), blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    text = self._event(answer, data)
                    if text:
                        if answer.first_token is None:
                            answer.first_token = time.perf_counter()
                        answer.chunks += 1
                        answer.text += text
                        yield text
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                raise self._unreachable(exc) from None
            raise ChatFailed(f"the connection to chatgate broke mid-answer ({type(exc).__name__})") from None
        finally:
            answer.ended = time.perf_counter()

    @staticmethod
    def _event(answer: Answer, data: str) -> str:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ChatFailed(f"chatgate sent an event that is not JSON: {data[:200]}") from None
        if not isinstance(event, dict):
            return ""
        error = event.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise ChatFailed(f"the model server failed mid-answer: {message}")
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            answer.completion_tokens = usage["completion_tokens"]
        choices = event.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return ""
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""

    def _unreachable(self, exc: httpx.TransportError) -> ChatFailed:
        return ChatFailed(
            f"chatgate is not answering at {self.url} ({type(exc).__name__}): start it with `chatgate serve`, "
            "or give its address with --url or CHATGATE_URL"
        )

    @staticmethod
    def _error(status: int, body: bytes) -> str:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        error = parsed.get("error") if isinstance(parsed, dict) else None
        error = error if isinstance(error, dict) else {}
        message = error.get("message")
        if not isinstance(message, str):
            message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
        code = str(error.get("code") or "")
        if code == "invalid_credentials":  # chatgate's own 401, not a model server's
            return f"the token was refused ({message}): give another with --token or CHATGATE_TOKEN"
        if code in ("service_unavailable", "internal_error"):  # chatgate's own failures
            return f"chatgate failed ({status}): {message}"
        if status >= 500 or code.startswith("upstream") or error.get("type") == "upstream_error":
            # An upstream's own OpenAI-shaped error is passed through as it came: its status says it.
            return f"the model server failed ({status}): {message}"
        return f"{message} ({status})"
