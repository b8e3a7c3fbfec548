"""Authentication: turn a request's credential into a `Principal`, or refuse it with a 401.

Two kinds of credential, both as `Authorization: Bearer …`:
- chatgate API tokens (`cg_…`), looked up by hash;
- Supabase access tokens (JWTs), also read from the browser's `sb-<ref>-auth-token` cookie.
And, without an Authorization header, the console's session cookie (`security/sessions.py`).
"""

from __future__ import annotations

import uuid

from starlette.requests import cookie_parser

from chatgate.accounts import Accounts
from chatgate.errors import Unauthorized
from chatgate.security.principal import Principal
from chatgate.security.sessions import SESSION_COOKIE, Sessions, check_origin
from chatgate.security.supabase import SupabaseVerifier, token_from_cookies
from chatgate.security.tokens import TOKEN_PREFIX

Headers = list[tuple[bytes, bytes]]

_MAX_CREDENTIAL = 16 * 1024


class Authenticator:
    """Checks the credential of each request."""

    def __init__(
        self, accounts: Accounts, supabase: SupabaseVerifier | None = None, sessions: Sessions | None = None
    ) -> None:
        self._accounts = accounts
        self._supabase = supabase
        self._sessions = sessions

    async def authenticate(self, headers: Headers, method: str = "GET") -> Principal:
        token = self._credential(headers)
        if isinstance(token, _SessionCookie):
            check_origin(method, token.origin, token.host)
            assert self._sessions is not None
            return await self._sessions.principal(token.secret)
        if token.startswith(TOKEN_PREFIX):
            principal = await self._accounts.principal_for_token(token)
            if principal is None:
                raise Unauthorized("API token is invalid or revoked")
            return principal
        if token.count(".") == 2:
            if self._supabase is None:
                raise Unauthorized("Supabase tokens are not accepted: CHATGATE_SUPABASE_JWT_SECRET is not set")
            subject = await self._supabase.verify(token)
            return Principal(uuid.UUID(subject), "supabase:" + subject)
        raise Unauthorized("Credential is not a chatgate API token or a Supabase access token")

    def _credential(self, headers: Headers) -> str | _SessionCookie:
        authorization = cookie = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"cookie":
                cookie = value
        if authorization is not None:
            scheme, _, value = authorization.partition(b" ")
            token = value.strip()
            if scheme.lower() != b"bearer" or not token:
                raise Unauthorized("Authorization header must be 'Bearer <token>'")
            if len(token) > _MAX_CREDENTIAL:
                raise Unauthorized("Credential is too long")
            return token.decode("latin-1")
        if cookie is not None:
            # Only without an Authorization header, so an API client pays nothing for this.
            cookies = _parse_cookies(cookie)
            session = cookies.get(SESSION_COOKIE) if self._sessions is not None else None
            if session:
                return _SessionCookie(session, headers)
            token_from_cookie = token_from_cookies(cookies) if self._supabase is not None else None
            if token_from_cookie:
                return token_from_cookie
        raise Unauthorized("Missing credential: send 'Authorization: Bearer <token>'")


def _parse_cookies(raw: bytes) -> dict[str, str]:
    # Leniently, as browsers send them: a Supabase session cookie may be raw JSON (quotes,
    # spaces, commas), which http.cookies' strict parser drops.
    return cookie_parser(raw.decode("latin-1"))


class _SessionCookie:
    """A console session id, with the headers its CSRF check needs."""

    __slots__ = ("host", "origin", "secret")

    def __init__(self, secret: str, headers: Headers) -> None:
        self.secret = secret
        self.origin = self.host = None
        for name, value in headers:
            if name == b"origin":
                self.origin = value
            elif name == b"host":
                self.host = value
