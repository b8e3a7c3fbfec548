"""Liveness, readiness, Prometheus metrics, and the API's own description."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.errors import NotFound
from chatgate.metrics import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Needs no credential."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "Draining: shutting down"}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: 503 from the moment a shutdown starts draining, for load balancers to stop
    sending new chats. Needs no credential."""
    if runtime.chats.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics of this process, for the scrape token (`CHATGATE_METRICS_TOKEN`), so
    that a Prometheus server needs no admin credential, or an admin's token."""
    if not _scrape_token_given(request, runtime.settings.metrics_token.get_secret_value()):
        principal = await runtime.admit(request.scope)
        if not principal.is_admin:
            raise NotFound("Not Found")
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _scrape_token_given(request: Request, token: str) -> bool:
    if not token:
        return False
    given = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(given, b"Bearer " + token.encode())


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request, _principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def swagger_ui(_principal: PrincipalDep) -> HTMLResponse:
    # In a browser this works with a Supabase session cookie or a console session; API tokens
    # use /openapi.json.
    return get_swagger_ui_html(openapi_url="/openapi.json", title="chatgate API")
