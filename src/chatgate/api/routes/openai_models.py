"""`/v1/models`: the registry in the OpenAI API's list format, for the SDKs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.api.openai_shapes import model_ids, model_object

router = APIRouter(prefix="/v1/models", tags=["openai"])


@router.get("")
async def openai_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """The models the caller may use, in OpenAI's list format. A model's `id` is its name, or
    its chatgate id when another listed model has the same name; both work as `model`."""
    visible = None if principal.is_admin else principal.user_id
    records = await runtime.registry.list(visible_to=visible)
    return {"object": "list", "data": [model_object(i, r) for i, r in model_ids(records)]}


@router.get("/{model:path}")
async def openai_model(model: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """One model, by the id `/v1/models` lists or by its chatgate id."""
    record = await runtime.model_by_ref(principal, model)
    same_name = [r for r in await runtime.registry.named(record.name) if principal.may_use(r.user_id, r.sharing)]
    return model_object(record.name if len(same_name) == 1 else str(record.id), record)
