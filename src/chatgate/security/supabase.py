"""Supabase access tokens: verify the JWT, and find it in the browser's session cookie.

Older Supabase projects sign with HS256 and the project's JWT secret; newer ones with RS256 or
ES256 keys published as a JWKS. The algorithm a token names only selects which of the
configured keys may verify it: HS256 is only ever checked against the secret, and JWKS keys
only with the asymmetric algorithm they were published for, so `none` and the HS256-with-a-
public-key confusion cannot happen.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import IO, Any
from urllib.error import HTTPError
from urllib.parse import unquote, urlsplit

import jwt

from chatgate.errors import ServiceUnavailable, Unauthorized

__all__ = ["SupabaseVerifier", "token_from_cookies"]

logger = logging.getLogger(__name__)

_ASYMMETRIC = frozenset({"RS256", "ES256"})
_MAX_TOKEN_CHARS = 16_384
_JWKS_TIMEOUT = 10.0
_MAX_JWKS_BYTES = 1 << 20  # a JWKS holds a few keys of a few hundred bytes each
# Reasons for a rejected token. Each names what is wrong, never what was right, and no token text.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience invalid"),
    (jwt.InvalidIssuerError, "token issuer invalid"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.DecodeError, "token malformed"),
)


class SupabaseVerifier:
    """Checks Supabase access tokens and returns the user id (`sub`) they carry."""

    def __init__(
        self,
        jwt_secret: str | None = None,
        jwks_url: str | None = None,
        audience: str = "authenticated",
        leeway: float = 30.0,
        *,
        issuer: str | None = None,
        refetch_interval: float = 30.0,
        jwks_max_age: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not jwt_secret and not jwks_url:
            raise ValueError("SupabaseVerifier needs a JWT secret, a JWKS URL, or both")
        self._secret = jwt_secret or None
        self._jwks_url = jwks_url or None
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._refetch_interval = refetch_interval
        self._jwks_max_age = jwks_max_age
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._fetch_lock = asyncio.Lock()

    async def verify(self, token: str) -> str:
        """Return the token's subject, a user UUID; raise Unauthorized saying what is wrong."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("token malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthorized("token malformed") from None
        key = await self._key_for(header.get("alg"), header.get("kid"))
        options: dict[str, Any] = {"require": ["exp"]}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(_reason(exc)) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("token has no subject")
        try:
            return str(uuid.UUID(subject))
        except ValueError:
            raise Unauthorized("token subject invalid") from None

    async def _key_for(self, alg: object, kid: object) -> Any:
        """The key that may verify a token signed with `alg` under `kid`."""
        if alg == "HS256" and self._secret is not None:
            return self._secret
        if alg not in _ASYMMETRIC or self._jwks_url is None:
            raise Unauthorized("token algorithm not accepted")
        if not isinstance(kid, str):
            raise Unauthorized("token signing key unknown")
        await self._refresh_if_due(kid)
        jwk = self._keys.get(kid)
        if jwk is None or jwk.algorithm_name != alg:
            raise Unauthorized("token signing key unknown")
        return jwk.key

    async def _refresh_if_due(self, kid: str) -> None:
        """Fetch the JWKS when never fetched, too old, or a token names a kid we lack
        (the last at most once per `refetch_interval`, so unknown kids cannot hammer Supabase)."""

        def due() -> bool:
            if self._fetched_at is None:
                return True
            age = self._clock() - self._fetched_at
            return age >= self._jwks_max_age or (kid not in self._keys and age >= self._refetch_interval)

        if not due():
            return
        async with self._fetch_lock:
            if due():  # another request may have fetched while we waited
                await self._fetch()

    async def _fetch(self) -> None:
        assert self._jwks_url is not None
        try:
            # A thread, because the stdlib client blocks; the timeout bounds the whole fetch
            # (urllib's own bounds each socket operation only).
            async with asyncio.timeout(_JWKS_TIMEOUT):
                document = json.loads(await asyncio.to_thread(_get_jwks, self._jwks_url))
        except (OSError, http.client.HTTPException, ValueError) as exc:  # TimeoutError is an OSError
            # Count the attempt, so a Supabase outage is not retried on every request.
            self._fetched_at = self._clock()
            logger.warning("cannot fetch the Supabase JWKS from %s: %s", self._jwks_url, str(exc) or type(exc).__name__)
            if not self._keys:
                raise ServiceUnavailable("cannot fetch the token signing keys") from exc
            return
        self._keys = _parse_jwks(document)
        self._fetched_at = self._clock()

    async def aclose(self) -> None:
        """Release what the verifier holds (nothing: each JWKS fetch uses its own connection)."""


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) URLs (urllib's default also follows ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise HTTPError(newurl, code, f"redirect to a non-HTTP URL ({msg})", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _get_jwks(url: str) -> bytes:
    """GET the JWKS document (blocking): http(s) only, no environment proxy (as the relay), at
    most `_MAX_JWKS_BYTES`; raises OSError (HTTPError for a non-2xx answer) or ValueError."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("the JWKS URL must be http(s)")
    # Only these handlers: no file:, ftp: or data: URLs, and no proxy from the environment.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _SameSchemeRedirects(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    request = urllib.request.Request(  # noqa: S310 - the opener above has only http(s) handlers
        url, headers={"Accept": "application/json", "User-Agent": "chatgate"}
    )
    with opener.open(request, timeout=_JWKS_TIMEOUT) as response:
        body: bytes = response.read(_MAX_JWKS_BYTES + 1)
    if len(body) > _MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS document is larger than {_MAX_JWKS_BYTES} bytes")
    return body


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return "token audience invalid" if exc.claim == "aud" else f"token has no {exc.claim} claim"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "token invalid"


def _parse_jwks(document: object) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by kid; unusable entries are skipped."""
    keys: dict[str, jwt.PyJWK] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if jwk.algorithm_name in _ASYMMETRIC:  # never a symmetric key from a public document
            keys[entry["kid"]] = jwk
    return keys


def token_from_cookies(cookies: Mapping[str, str]) -> str | None:
    """The access token in a Supabase session cookie `sb-<ref>-auth-token` (or its chunks
    `.0`, `.1`, …), plain JSON or `base64-` prefixed; None when absent or malformed."""
    whole: dict[str, str] = {}
    chunks: dict[str, dict[int, str]] = {}
    for name, value in cookies.items():
        if not name.startswith("sb-"):
            continue
        stem, dot, index = name.rpartition(".")
        if dot and stem.endswith("-auth-token") and index.isdigit():
            chunks.setdefault(stem, {})[int(index)] = value
        elif name.endswith("-auth-token"):
            whole[name] = value
    for stem in sorted(whole.keys() | chunks.keys()):
        if stem in whole:
            value = whole[stem]
        else:
            parts = chunks[stem]
            # Chunks are read in order until the first gap, as @supabase/ssr does.
            pieces: list[str] = []
            while len(pieces) in parts:
                pieces.append(parts[len(pieces)])
            value = "".join(pieces)
        token = _access_token(value)
        if token is not None:
            return token
    return None


def _access_token(value: str) -> str | None:
    """Parse one session cookie value; None when it holds no access token."""
    if value.startswith("base64-"):
        encoded = value[len("base64-") :]
        try:
            value = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
    elif value[:1] == "%":
        value = unquote(value)  # older auth-helpers percent-encoded the JSON
    try:
        session = json.loads(value)
    except ValueError:
        return None
    if isinstance(session, dict) and isinstance(session.get("currentSession"), dict):
        session = session["currentSession"]  # supabase-js v1 storage layout
    if isinstance(session, dict):
        token = session.get("access_token")
    elif isinstance(session, list) and session:
        token = session[0]  # auth-helpers: [access_token, refresh_token, provider tokens…]
    else:
        return None
    return token if isinstance(token, str) and token else None
