"""chatgate API tokens: format, hashing, display prefix, comparison."""

from __future__ import annotations

import hashlib
import re

from chatgate.security.tokens import constant_time_equals, new_token, token_hash, token_prefix


def test_new_token_format_and_uniqueness() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert re.fullmatch(r"cg_[A-Za-z0-9_-]{43}", token)


def test_token_hash_is_sha256_hex() -> None:
    token = new_token()
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token_hash(token) == token_hash(token)
    assert token_hash(token) != token_hash(new_token())
    assert re.fullmatch(r"[0-9a-f]{64}", token_hash(token))


def test_token_prefix_shows_ten_characters() -> None:
    token = new_token()
    assert token_prefix(token) == token[:10]
    assert token_prefix(token).startswith("cg_")


def test_constant_time_equals() -> None:
    token = new_token()
    assert constant_time_equals(token, str(token))
    assert not constant_time_equals(token, token[:-1])
    assert not constant_time_equals(token, new_token())
    assert constant_time_equals("ключ", "ключ")  # non-ASCII must not raise
    assert not constant_time_equals("ключ", "ключи")
