"""The control plane: model registry REST endpoints and health, on FastAPI.

Not on the chat hot path, so it can afford a framework: validation, OpenAPI and dependency
injection for the caller's identity.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatgate import __version__
from chatgate.api import chat_openai
from chatgate.checks import check_model
from chatgate.errors import ChatgateError, NotFound, ValidationFailed
from chatgate.metrics import CONTENT_TYPE_LATEST
from chatgate.registry import ModelCreate, ModelRecord, ModelUpdate, parse_id
from chatgate.runtime import Runtime
from chatgate.security.principal import Principal
from chatgate.usage import query_usage

log = logging.getLogger("chatgate")


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
        # Served below, behind a credential like every endpoint but /healthz.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ChatgateError)
    async def _chatgate_error(request: Request, exc: ChatgateError) -> JSONResponse:
        if _openai_path(request):
            return JSONResponse(chat_openai.render_error(exc), status_code=exc.status, headers=_error_headers(exc))
        payload: dict[str, Any] = {"message": exc.message}
        if isinstance(exc, ValidationFailed):
            payload["errors"] = exc.errors
        return JSONResponse(payload, status_code=exc.status, headers=_error_headers(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if _openai_path(request):
            failed = ChatgateError(str(exc.detail))
            failed.status = exc.status_code
            return JSONResponse(chat_openai.render_error(failed), status_code=exc.status_code, headers=exc.headers)
        # Unknown paths and methods, unreadable bodies: the same `{"message"}` form as the rest.
        return JSONResponse({"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return JSONResponse({"message": "Request body is not valid JSON"}, status_code=400)
        failed = ValidationFailed.from_pydantic(exc)
        return JSONResponse({"message": failed.message, "errors": failed.errors}, status_code=failed.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this handler; the server logs the traceback too.
        log.error("%s %s: unexpected error: %r", request.method, request.url.path, exc)
        return JSONResponse({"message": "An unexpected error occurred"}, status_code=500)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers. Needs no credential."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Draining: shutting down"}})
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """Readiness: 503 from the moment a shutdown starts draining, for load balancers to stop
        sending new chats. Needs no credential."""
        if runtime.chats.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(runtime: RuntimeDep, principal: PrincipalDep) -> Response:
        """Prometheus counters of this process (admins only: scrape with an admin token)."""
        if not principal.is_admin:
            raise NotFound("Not Found")
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(_principal: PrincipalDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(_principal: PrincipalDep) -> HTMLResponse:
        # In a browser this works with a Supabase session cookie; API tokens use /openapi.json.
        return get_swagger_ui_html(openapi_url="/openapi.json", title="chatgate API")

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

    @app.post("/api/models/{model_id}/check", tags=["models"])
    async def check(model_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        """Ask the model's server for its model list and a one-token chat: latency of each, whether
        the server lists the model, and the error otherwise (`verdict`: ok, warning or failed)."""
        record = await runtime.model_for_chat(principal, parse_id(model_id))
        result = await check_model(runtime.upstream, runtime.settings, record)
        return result.public()

    @app.get("/v1/models", tags=["openai"])
    async def openai_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        """The models the caller may use, in OpenAI's list format. A model's `id` is its name, or
        its chatgate id when another listed model has the same name; both work as `model`."""
        visible = None if principal.is_admin else principal.user_id
        records = await runtime.registry.list(visible_to=visible)
        return {"object": "list", "data": [chat_openai.model_object(i, r) for i, r in chat_openai.model_ids(records)]}

    @app.get("/v1/models/{model:path}", tags=["openai"])
    async def openai_model(model: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
        """One model, by the id `/v1/models` lists or by its chatgate id."""
        record = await runtime.model_by_ref(principal, model)
        same_name = [r for r in await runtime.registry.named(record.name) if principal.may_use(r.user_id, r.sharing)]
        return chat_openai.model_object(record.name if len(same_name) == 1 else str(record.id), record)

    @app.get("/api/usage", tags=["usage"])
    async def usage(
        runtime: RuntimeDep,
        principal: PrincipalDep,
        model: Annotated[str | None, Query(description="A model's id, or a name (every model that has it)")] = None,
        since: Annotated[datetime | None, Query(description="ISO time, inclusive; UTC when no offset")] = None,
        until: Annotated[datetime | None, Query(description="ISO time, exclusive; UTC when no offset")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        """Recorded chats, newest first: every user's for an admin, the caller's own otherwise."""
        user_id = None if principal.is_admin else principal.user_id
        records = await query_usage(runtime.engine, model=model, user_id=user_id, since=since, until=until, limit=limit)
        return {"data": [record.public() for record in records]}

    return app


def _openai_path(request: Request) -> bool:
    """Under /v1/ errors take OpenAI's shape, so that its SDKs raise their usual exceptions."""
    return request.url.path.startswith("/v1/")


def _error_headers(exc: ChatgateError) -> dict[str, str] | None:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else None
