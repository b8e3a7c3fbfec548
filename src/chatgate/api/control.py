"""The control plane: model registry REST endpoints and health, on FastAPI.

Not on the chat hot path, so it can afford a framework: validation, OpenAPI and dependency
injection for the caller's identity.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from chatgate import __version__
from chatgate.errors import ChatgateError, NotFound, ValidationFailed
from chatgate.registry import ModelCreate, ModelRecord, ModelUpdate, parse_id
from chatgate.runtime import Runtime
from chatgate.security.principal import Principal


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def principal_of(request: Request) -> Principal:
    return await runtime_of(request).admit(request.scope)


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
PrincipalDep = Annotated[Principal, Depends(principal_of)]


async def _managed(runtime: Runtime, principal: Principal, model_id: str) -> ModelRecord:
    """A model the caller may change: any other is answered like one that does not exist."""
    record = await runtime.registry.get(parse_id(model_id))
    if not principal.may_manage(record.user_id):
        raise NotFound("Model not found")
    return record


def build_control_app() -> FastAPI:
    app = FastAPI(
        title="chatgate",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
    )

    @app.exception_handler(ChatgateError)
    async def _chatgate_error(_request: Request, exc: ChatgateError) -> JSONResponse:
        payload: dict[str, Any] = {"message": exc.message}
        if isinstance(exc, ValidationFailed):
            payload["errors"] = exc.errors
        return JSONResponse(payload, status_code=exc.status, headers=_error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        failed = ValidationFailed.from_pydantic(exc)
        return JSONResponse({"message": failed.message, "errors": failed.errors}, status_code=failed.status)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers. Needs no credential."""
        return {"status": "ok"}

    @app.post("/api/models", status_code=201, tags=["models"])
    async def create_model(data: ModelCreate, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        """Register a model owned by the caller. The response shows the API key masked."""
        record = await runtime.registry.create(principal.user_id, data)
        return record.public()

    @app.get("/api/models", tags=["models"])
    async def list_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        """The models the caller may use: their own and the shared ones."""
        visible = None if principal.is_admin else principal.user_id
        return {"data": [r.public() for r in await runtime.registry.list(visible_to=visible)]}

    @app.get("/api/models/{model_id}", tags=["models"])
    async def get_model(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        record = await runtime.registry.get(parse_id(model_id))
        if not principal.may_use(record.user_id, record.sharing):
            raise NotFound("Model not found")
        return record.public()

    @app.patch("/api/models/{model_id}", tags=["models"])
    async def update_model(
        model_id: str, data: ModelUpdate, runtime: RuntimeDep, principal: PrincipalDep
    ) -> dict[str, Any]:
        """Change the given fields; the others stay as they are."""
        record = await _managed(runtime, principal, model_id)
        return (await runtime.registry.update(record.id, data)).public()

    @app.delete("/api/models/{model_id}", status_code=204, tags=["models"])
    async def delete_model(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
        record = await _managed(runtime, principal, model_id)
        await runtime.registry.delete(record.id)
        return Response(status_code=204)

    return app


def _error_headers(exc: ChatgateError) -> dict[str, str] | None:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else None
