"""`/api/users` and `/api/tokens`: who may call chatgate (the CLI's `users` and `tokens`, over HTTP).

Admins manage everyone; a user sees, creates and revokes their own tokens only. A token is in
the response that creates it and nowhere else, ever.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StringConstraints

from chatgate.accounts import TokenInfo, User
from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.errors import NotFound
from chatgate.security.principal import Principal

router = APIRouter(tags=["accounts"])


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # Shown in the console and the CLI's tables: no control characters.
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
    is_admin: bool = False


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    user: Annotated[str | None, StringConstraints(min_length=1, max_length=100)] = None


def _admin(principal: Principal) -> None:
    # Like /metrics: to anyone else the admin routes do not exist.
    if not principal.is_admin:
        raise NotFound("Not Found")


def _user(user: User) -> dict[str, Any]:
    return {"id": str(user.id), "name": user.name, "is_admin": user.is_admin, "created_at": user.created_at.isoformat()}


def _token(info: TokenInfo) -> dict[str, Any]:
    return {
        "id": str(info.id),
        "user": info.user,
        "prefix": info.prefix,
        "created_at": info.created_at.isoformat(),
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
    }


@router.get("/api/users")
async def list_users(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Every user (admins only)."""
    _admin(principal)
    return {"data": [_user(user) for user in await runtime.accounts.users()]}


@router.post("/api/users", status_code=201)
async def create_user(data: UserCreate, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Add a user (admins only); give them a token with `POST /api/tokens`."""
    _admin(principal)
    return _user(await runtime.accounts.add_user(data.name, is_admin=data.is_admin))


@router.get("/api/tokens")
async def list_tokens(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Tokens by their prefix, never the token: everyone's for an admin, the caller's otherwise."""
    owner = None if principal.is_admin else principal.name
    return {"data": [_token(info) for info in await runtime.accounts.tokens(owner)]}


@router.post("/api/tokens", status_code=201)
async def create_token(data: TokenCreate, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """A new token for the caller (or, for an admin, for `user`): shown in this response only."""
    owner = data.user or principal.name
    if owner != principal.name:
        _admin(principal)
    info, token = await runtime.accounts.create_token(owner)
    return {**_token(info), "token": token}


@router.delete("/api/tokens/{token_id}")
async def revoke_token(token_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Revoke a token by its id; a token of someone else is answered as missing (unless admin)."""
    owner = None if principal.is_admin else principal.name
    if not any(str(info.id) == token_id for info in await runtime.accounts.tokens(owner)):
        raise NotFound("Token not found")
    await runtime.accounts.revoke(token_id)
    return next(_token(info) for info in await runtime.accounts.tokens(owner) if str(info.id) == token_id)
