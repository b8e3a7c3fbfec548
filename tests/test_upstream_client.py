"""Upstream helpers: the chat-completions URL and the message of an upstream error body."""

from __future__ import annotations

import pytest

from chatgate.upstream.client import chat_completions_url, error_message


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://h:1/v1", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1/", "http://h:1/v1/chat/completions"),
        ("", "https://api.openai.com/v1/chat/completions"),
        ("  ", "https://api.openai.com/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base_url: str, url: str) -> None:
    assert chat_completions_url(base_url) == url


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad key", "type": "x"}}', "bad key"),
        (b'{"error": {"message": ["a", "b"]}}', '["a","b"]'),
        (b'{"error": "model not found"}', "model not found"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', '[{"loc":["body"],"msg":"field required"}]'),
        (b'{"message": "plain message"}', "plain message"),
        (b"Bad Gateway\n", "Bad Gateway"),
        (b"", None),
        (b"{}", None),
    ],
)
def test_error_message(body: bytes, message: str | None) -> None:
    assert error_message(body) == message
