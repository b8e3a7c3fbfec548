"""`/api/session`: the console's sign-in (an API token for a session cookie) and sign-out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from chatgate.api.asgi import header
from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.errors import BadRequest
from chatgate.security.principal import Principal
from chatgate.security.sessions import SESSION_COOKIE
from chatgate.security.tokens import TOKEN_PREFIX

router = APIRouter(prefix="/api/session", tags=["session"])


def _who(principal: Principal) -> dict[str, Any]:
    return {"user_id": str(principal.user_id), "name": principal.name, "is_admin": principal.is_admin}


def _over_tls(request: Request) -> bool:
    """Whether the browser reached us over TLS: directly, or through a proxy that says so. Trusting
    the proxy's header costs nothing here: it can only make the cookie stricter (`Secure`)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


@router.get("")
async def whoami(principal: PrincipalDep) -> dict[str, Any]:
    """Who the credential (session cookie, API token or Supabase session) belongs to."""
    return _who(principal)


@router.post("")
async def sign_in(request: Request, response: Response, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Exchange the API token of the Authorization header for an `HttpOnly`, `SameSite=Strict`
    session cookie (`Secure` over TLS): the page forgets the token and the browser never keeps it.

    The token comes in a header, not a form, so a page elsewhere cannot sign a browser in to an
    account of its choosing: a cross-origin request may not set Authorization without a CORS
    preflight, which chatgate does not answer."""
    scheme, _, token = (header(request.scope, b"authorization") or b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
        raise BadRequest("Sign in with a chatgate API token: 'Authorization: Bearer cg_…'")
    session = await runtime.sessions.open(token)
    response.set_cookie(
        SESSION_COOKIE,
        session.secret,
        expires=session.expires_at,
        path="/",
        secure=_over_tls(request),
        httponly=True,
        samesite="strict",
    )
    return {**_who(principal), "expires_at": session.expires_at.isoformat()}


@router.delete("", status_code=204)
async def sign_out(request: Request, runtime: RuntimeDep, _principal: PrincipalDep) -> Response:
    """End the session on the server (the cookie is dead even if a copy was kept) and clear it."""
    response = Response(status_code=204)
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        await runtime.sessions.end(secret)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=_over_tls(request), httponly=True, samesite="strict")
    return response
