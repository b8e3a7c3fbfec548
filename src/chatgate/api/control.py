"""The control plane: everything but the two chat routes, on FastAPI.

Not on the chat hot path, so it can afford a framework: validation, OpenAPI and dependency
injection for the caller's identity. Each resource has its router in `api/routes/`; this module
assembles them and renders every error in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatgate import __version__
from chatgate.api.openai_shapes import render_error
from chatgate.api.routes import accounts, console, health, models, openai_models, session, usage
from chatgate.console.assets import Assets
from chatgate.errors import ChatgateError, ValidationFailed

log = logging.getLogger("chatgate")

ROUTERS = (
    health.router,
    session.router,
    models.router,
    openai_models.router,
    usage.router,
    accounts.router,
    console.router,
)


def build_control_app() -> FastAPI:
    app = FastAPI(
        title="chatgate",
        version=__version__,
        # Served by `routes.health`, behind a credential like every endpoint but /healthz.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(ChatgateError, _chatgate_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    for router in ROUTERS:
        app.include_router(router)
    # The console's files, read once: they cannot change while the process runs.
    app.state.console_assets = Assets.from_package()
    return app


async def _chatgate_error(request: Request, exc: ChatgateError) -> JSONResponse:
    if _openai_path(request):
        return JSONResponse(render_error(exc), status_code=exc.status, headers=_error_headers(exc))
    payload: dict[str, Any] = {"message": exc.message}
    if isinstance(exc, ValidationFailed):
        payload["errors"] = exc.errors
    return JSONResponse(payload, status_code=exc.status, headers=_error_headers(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if _openai_path(request):
        failed = ChatgateError(str(exc.detail))
        failed.status = exc.status_code
        return JSONResponse(render_error(failed), status_code=exc.status_code, headers=exc.headers)
    # Unknown paths and methods, unreadable bodies: the same `{"message"}` form as the rest.
    return JSONResponse({"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        return JSONResponse({"message": "Request body is not valid JSON"}, status_code=400)
    failed = ValidationFailed.from_pydantic(exc)
    return JSONResponse({"message": failed.message, "errors": failed.errors}, status_code=failed.status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this handler; the server logs the traceback too.
    log.error("%s %s: unexpected error: %r", request.method, request.url.path, exc)
    return JSONResponse({"message": "An unexpected error occurred"}, status_code=500)


def _openai_path(request: Request) -> bool:
    """Under /v1/ errors take OpenAI's shape, so that its SDKs raise their usual exceptions."""
    return request.url.path.startswith("/v1/")


def _error_headers(exc: ChatgateError) -> dict[str, str] | None:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else None
