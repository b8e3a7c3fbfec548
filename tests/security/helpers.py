"""Helpers the security tests share: chat bodies, direct database access, JWT minting."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from tests.support import ChatgateServer

from chatgate.store.schema import models, users

NO_SUCH_MODEL = "00000000-0000-4000-8000-000000000000"


def error_message(response: httpx.Response) -> str:
    """The message of an error answer: `{"message"}`, or OpenAI's `{"error": {"message"}}` on /v1."""
    body = response.json()
    if isinstance(body.get("error"), dict):
        return str(body["error"]["message"])
    return str(body["message"])


def chat_body(model_id: str, model: str | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"temperature": 0.5}
    if model is not None:
        settings["model"] = model
    return {"chatSettings": settings, "messages": [{"role": "user", "content": "hi"}], "customModelId": model_id}


def chat(server: ChatgateServer, token: str | None, model_id: str, model: str | None = None) -> httpx.Response:
    with server.client(token) as client:
        return client.post("/api/chat/custom", json=chat_body(model_id, model))


def db_path(server: ChatgateServer) -> Path:
    return server.data_dir / "chatgate.db"


def db_bytes(server: ChatgateServer) -> bytes:
    """Everything SQLite keeps on disk for the database: the file and its write-ahead log."""
    return b"".join(p.read_bytes() for p in server.data_dir.glob("chatgate.db*") if p.is_file())


def engine(server: ChatgateServer) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{db_path(server)}")


def insert_model_row(server: ChatgateServer, *, base_url: str, model_id: str, api_key: str = "", **fields: Any) -> str:
    """Write a row straight into the table, as chatbot-ui (or an older policy) would: no check."""
    eng = engine(server)
    try:
        with eng.begin() as conn:
            owner = conn.execute(sa.select(users.c.id).where(users.c.name == "admin")).scalar_one()
            row_id = uuid.uuid4()
            now = datetime.now(UTC)
            conn.execute(
                models.insert().values(
                    id=row_id,
                    user_id=fields.pop("user_id", owner),
                    created_at=now,
                    updated_at=now,
                    sharing=fields.pop("sharing", "private"),
                    api_key=api_key,
                    base_url=base_url,
                    description="",
                    model_id=model_id,
                    name=fields.pop("name", "raw row"),
                    context_length=4096,
                )
            )
    finally:
        eng.dispose()
    return str(row_id)


def stored_api_key(server: ChatgateServer, model_id: str) -> str:
    eng = engine(server)
    try:
        with eng.connect() as conn:
            query = sa.select(models.c.api_key).where(models.c.id == uuid.UUID(model_id))
            value: str = conn.execute(query).scalar_one()
            return value
    finally:
        eng.dispose()
