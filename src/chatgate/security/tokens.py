"""chatgate's own API tokens: `cg_` plus 256 random bits, stored only as a hash.

The token is shown once, at creation; the database keeps `token_hash` (to look it up) and
`token_prefix` (so a user can tell their tokens apart).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["TOKEN_PREFIX", "constant_time_equals", "new_token", "token_hash", "token_prefix"]

TOKEN_PREFIX = "cg_"  # noqa: S105 - the public marker that makes leaked tokens greppable
_DISPLAY_CHARS = 10


def new_token() -> str:
    """A fresh API token: "cg_" + 43 urlsafe characters (32 random bytes)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The sha256 hex digest under which a token is stored and looked up."""
    # A plain fast hash is right here: the token carries 256 random bits, so there is nothing
    # to brute-force and a slow KDF (bcrypt, argon2) would only add latency to every request.
    # Being unsalted and deterministic is what lets the hash serve as the lookup key.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_prefix(token: str) -> str:
    """The first 10 characters, for display ("cg_AbCdEfG"); reveals 7 of 43 random characters."""
    return token[:_DISPLAY_CHARS]


def constant_time_equals(a: str, b: str) -> bool:
    """Compare two secrets without leaking, through timing, where they first differ."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
