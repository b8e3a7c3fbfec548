"""chatgate on a chatbot-ui (Supabase) database: its `public.models` table used as it is.

The database gets chatbot-ui's schema (the `models` table of its migrations, with a minimal
`auth.users` and `folders` as stand-ins for Supabase's); chatgate's own tables must appear
beside it, the table itself must stay exactly as it was, and a row inserted by plain SQL must be
usable by the Supabase user whose `sub` owns it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, services, unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.backends("postgresql")]

JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"

# supabase/migrations/20240108234540_setup.sql (the parts models needs),
# 20240125194719_add_custom_models.sql, and the later context_length column.
CHATBOT_UI_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE SCHEMA auth;
CREATE TABLE auth.users (id UUID PRIMARY KEY DEFAULT uuid_generate_v4(), email TEXT);
CREATE TABLE folders (id UUID PRIMARY KEY DEFAULT uuid_generate_v4());

CREATE OR REPLACE FUNCTION update_updated_at_column()
RETURNS TRIGGER AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$ language 'plpgsql';

CREATE TABLE IF NOT EXISTS models (
    id UUID NOT NULL DEFAULT uuid_generate_v4() PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES auth.users(id) ON DELETE CASCADE,
    folder_id UUID REFERENCES folders(id) ON DELETE SET NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ,
    sharing TEXT NOT NULL DEFAULT 'private',
    api_key TEXT NOT NULL CHECK (char_length(api_key) <= 1000),
    base_url TEXT NOT NULL CHECK (char_length(base_url) <= 1000),
    description TEXT NOT NULL CHECK (char_length(description) <= 500),
    model_id TEXT NOT NULL CHECK (char_length(model_id) <= 1000),
    name TEXT NOT NULL CHECK (char_length(name) <= 100)
);
CREATE INDEX models_user_id_idx ON models(user_id);
ALTER TABLE models ENABLE ROW LEVEL SECURITY;
CREATE TRIGGER update_models_updated_at
BEFORE UPDATE ON models
FOR EACH ROW
EXECUTE PROCEDURE update_updated_at_column();
ALTER TABLE models ADD COLUMN context_length INT NOT NULL DEFAULT 4096;
"""

# What "the table as it is" means: columns, constraints, indexes, triggers, RLS.
SHAPE = """
SELECT 'column' AS kind, column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
  FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'models'
UNION ALL
SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE conrelid = 'public.models'::regclass
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'models'
UNION ALL
SELECT 'trigger', tgname FROM pg_trigger WHERE tgrelid = 'public.models'::regclass AND NOT tgisinternal
UNION ALL
SELECT 'rls', relrowsecurity::text FROM pg_class WHERE oid = 'public.models'::regclass
ORDER BY 1, 2
"""


def supabase_token(sub: uuid.UUID, **claims: Any) -> str:
    payload = {"sub": str(sub), "aud": "authenticated", "role": "authenticated", "exp": int(time.time()) + 600}
    return jwt.encode(payload | claims, JWT_SECRET, algorithm="HS256")


@pytest.fixture
def chatbot_ui_db() -> Iterator[str]:
    """A fresh database holding chatbot-ui's schema; its URL."""
    services.require("PostgreSQL", services.postgres_problem())
    url = services.create_database("chatgate_chatbotui")
    try:
        services.sql(url, CHATBOT_UI_SCHEMA)
        yield url
    finally:
        services.drop_database(url)


def add_supabase_user(url: str) -> uuid.UUID:
    user_id = uuid.uuid4()
    services.sql(url, "INSERT INTO auth.users (id, email) VALUES ($1, $2)", user_id, f"{user_id.hex[:8]}@example.com")
    return user_id


def insert_model_row(url: str, owner: uuid.UUID, base_url: str, model_id: str, api_key: str) -> uuid.UUID:
    """A row as chatbot-ui writes it: plain SQL, the key in plain text."""
    rows = services.sql(
        url,
        "INSERT INTO models (user_id, api_key, base_url, description, model_id, name)"
        " VALUES ($1, $2, $3, '', $4, $5) RETURNING id",
        owner,
        api_key,
        base_url,
        model_id,
        unique_name("row"),
    )
    return uuid.UUID(str(rows[0]["id"]))


def chat(server: ChatgateServer, token: str, model_ref: uuid.UUID | str) -> Any:
    body = {
        "chatSettings": {"temperature": 0.5},  # no model: the row's model_id is used
        "messages": [{"role": "user", "content": "hi"}],
        "customModelId": str(model_ref),
    }
    with server.client(token) as client:
        return client.post("/api/chat/custom", json=body)


@pytest.fixture
def on_chatbot_ui(chatbot_ui_db: str, make_chatgate: Callable[..., ChatgateServer]) -> Callable[..., ChatgateServer]:
    def start(**env: object) -> ChatgateServer:
        return make_chatgate(database_url=chatbot_ui_db, supabase_jwt_secret=JWT_SECRET, **env)

    return start


def test_migrations_leave_the_models_table_as_it_is(
    chatbot_ui_db: str, on_chatbot_ui: Callable[..., ChatgateServer]
) -> None:
    before = [tuple(r) for r in services.sql(chatbot_ui_db, SHAPE)]
    owner = add_supabase_user(chatbot_ui_db)
    row_id = insert_model_row(chatbot_ui_db, owner, "http://127.0.0.1:1/v1", "m", "sk-plain")
    server = on_chatbot_ui()
    assert server.cli("db", "upgrade").returncode == 0  # a second run changes nothing either
    assert [tuple(r) for r in services.sql(chatbot_ui_db, SHAPE)] == before
    tables = {
        r["table_name"]
        for r in services.sql(
            chatbot_ui_db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    }
    assert {"models", "folders", "chatgate_users", "chatgate_tokens"} <= tables
    assert all(t in {"models", "folders", "alembic_version"} or t.startswith("chatgate_") for t in tables)
    (row,) = services.sql(chatbot_ui_db, "SELECT api_key FROM models WHERE id = $1", row_id)
    assert row["api_key"] == "sk-plain"


def test_chat_through_a_row_written_by_chatbot_ui(
    chatbot_ui_db: str, on_chatbot_ui: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = on_chatbot_ui()
    owner, stranger = add_supabase_user(chatbot_ui_db), add_supabase_user(chatbot_ui_db)
    name = unique_name("m")
    fake.script(name, scripts.stream("Hello from the row"))
    row_id = insert_model_row(chatbot_ui_db, owner, fake.base_url, name, "sk-chatbot-ui-plain-key")

    response = chat(server, supabase_token(owner), row_id)
    assert response.status_code == 200, response.text
    assert response.text == "Hello from the row"
    (request,) = fake.requests(model=name)
    assert request["headers"]["authorization"] == "Bearer sk-chatbot-ui-plain-key"

    # Another Supabase user does not see a private row; the owner's listing shows it, key masked.
    assert chat(server, supabase_token(stranger), row_id).status_code == 404
    with server.client(supabase_token(owner)) as client:
        listed = client.get("/api/models").json()["data"]
    assert [m["id"] for m in listed] == [str(row_id)]
    assert listed[0]["api_key"] != "sk-chatbot-ui-plain-key"


@pytest.mark.parametrize("encrypt", [False, True])
def test_writes_through_chatgate_stay_readable_by_chatbot_ui_unless_encrypted(
    chatbot_ui_db: str, on_chatbot_ui: Callable[..., ChatgateServer], fake: FakeUpstream, encrypt: bool
) -> None:
    server = on_chatbot_ui(encrypt_api_keys=encrypt)
    owner = add_supabase_user(chatbot_ui_db)
    name = unique_name("m")
    fake.script(name, scripts.stream("ok"))
    model = server.add_model(supabase_token(owner), base_url=fake.base_url, model_id=name, api_key="sk-written-by-cg")
    (row,) = services.sql(chatbot_ui_db, "SELECT user_id, api_key FROM models WHERE id = $1", uuid.UUID(model))
    assert row["user_id"] == owner
    if encrypt:
        assert row["api_key"].startswith("cg1:")
    else:
        assert row["api_key"] == "sk-written-by-cg"  # what chatbot-ui's route reads and sends
    assert chat(server, supabase_token(owner), model).text == "ok"
    (request,) = fake.requests(model=name)
    assert request["headers"]["authorization"] == "Bearer sk-written-by-cg"


def test_a_chatgate_user_cannot_own_a_row_of_chatbot_uis_table(
    on_chatbot_ui: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = on_chatbot_ui()
    with server.client() as client:  # the chatgate admin: not a Supabase user
        response = client.post("/api/models", json={"name": "x", "base_url": fake.base_url, "model_id": "x"})
    assert response.status_code == 400
    assert "Supabase" in response.json()["message"]
