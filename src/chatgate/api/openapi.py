"""chatgate's OpenAPI document: FastAPI's for the control plane, plus the chat routes.

The chat routes are pure ASGI outside FastAPI (see `app.py`), so FastAPI cannot describe them;
each chat module hands in a path item written by hand. Every operation needs a bearer
credential except `GET /healthz` and `GET /readyz`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PUBLIC_OPERATIONS = (("/healthz", "get"), ("/readyz", "get"))

MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"message": {"type": "string"}},
    "required": ["message"],
}


def error_response(description: str) -> dict[str, Any]:
    """An error answer: JSON `{"message"}`."""
    return {"description": description, "content": {"application/json": {"schema": MESSAGE_SCHEMA}}}


def install(app: FastAPI, extra_paths: Mapping[str, dict[str, Any]]) -> None:
    """Make `app.openapi()` describe the control plane and `extra_paths`, with bearer auth."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            paths = document.setdefault("paths", {})
            for path, item in extra_paths.items():
                paths.setdefault(path, {}).update(item)
            components = document.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "A chatgate API token (`cg_…`) or a Supabase access token",
            }
            document["security"] = [{"bearer": []}]
            for path, method in PUBLIC_OPERATIONS:
                operation = paths.get(path, {}).get(method)
                if operation is not None:
                    operation["security"] = []
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
