"""The web console: its page at `/` and its files under `/console/`. Needs no credential (the
page signs in through `/api/session`); adds nothing to the chat routes, which it calls like any
other client."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from chatgate.console.assets import CSP, Asset, Assets
from chatgate.errors import NotFound

router = APIRouter(include_in_schema=False)

SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@router.get("/")
async def console_page(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get("/console/{path:path}")
async def console_file(path: str, request: Request) -> Response:
    return _serve(request, path)


def _serve(request: Request, path: str) -> Response:
    assets: Assets = request.app.state.console_assets  # read from the package by control.py
    asset = assets.get(path)
    if asset is None:
        raise NotFound("Not Found")
    headers = {**SECURITY_HEADERS, "cache-control": asset.cache_control, "etag": asset.etag}
    if asset.gzipped is not None:
        headers["vary"] = "Accept-Encoding"
    if _matches(request.headers.get("if-none-match"), asset):
        return Response(status_code=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        body = asset.gzipped
        headers["content-encoding"] = "gzip"
    return Response(body, media_type=asset.content_type, headers=headers)


def _matches(if_none_match: str | None, asset: Asset) -> bool:
    if not if_none_match:
        return False
    return if_none_match.strip() == "*" or asset.etag in (
        tag.strip().removeprefix("W/") for tag in if_none_match.split(",")
    )
