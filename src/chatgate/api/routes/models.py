"""`/api/models`: the model registry, and the check that a model's server answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.checks import check_model
from chatgate.errors import NotFound
from chatgate.registry import ModelCreate, ModelRecord, ModelUpdate, parse_id
from chatgate.runtime import Runtime
from chatgate.security.principal import Principal

router = APIRouter(prefix="/api/models", tags=["models"])


async def _managed(runtime: Runtime, principal: Principal, model_id: str) -> ModelRecord:
    """A model the caller may change: any other is answered like one that does not exist."""
    record = await runtime.registry.get(parse_id(model_id))
    if not principal.may_manage(record.user_id):
        raise NotFound("Model not found")
    return record


@router.post("", status_code=201)
async def create_model(data: ModelCreate, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Register a model owned by the caller. The response shows the API key masked."""
    record = await runtime.registry.create(principal.user_id, data)
    return record.public()


@router.get("")
async def list_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """The models the caller may use: their own and the shared ones."""
    visible = None if principal.is_admin else principal.user_id
    records = await runtime.registry.list(visible_to=visible)
    return {"data": [r.public(routes=principal.may_manage(r.user_id)) for r in records]}


@router.get("/{model_id}")
async def get_model(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    record = await runtime.registry.get(parse_id(model_id))
    if not principal.may_use(record.user_id, record.sharing):
        raise NotFound("Model not found")
    # Fallbacks and members are the owner's: another user's id could be an unlisted model's.
    return record.public(routes=principal.may_manage(record.user_id))


@router.patch("/{model_id}")
async def update_model(
    model_id: str, data: ModelUpdate, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Change the given fields; the others stay as they are. `fallbacks` (model ids, tried in
    order when this model fails) and `members` (`{id, weight}`: a balancing group) replace the
    current lists; `[]` removes them. Each must be a model the owner may use."""
    record = await _managed(runtime, principal, model_id)
    return (await runtime.registry.update(record.id, data)).public()


@router.delete("/{model_id}", status_code=204)
async def delete_model(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    record = await _managed(runtime, principal, model_id)
    await runtime.registry.delete(record.id)
    return Response(status_code=204)


@router.post("/{model_id}/check")
async def check(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Ask the model's server for its model list and a one-token chat: latency of each, whether
    the server lists the model, and the error otherwise (`verdict`: ok, warning or failed)."""
    record = await runtime.model_for_chat(principal, parse_id(model_id))
    result = await check_model(runtime.upstream, runtime.settings, record)
    return result.public()
