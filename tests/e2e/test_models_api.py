"""The registry's REST API: /api/models, with validation that names the field and the limit."""

from __future__ import annotations

from typing import Any

import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name

pytestmark = pytest.mark.e2e


def new_model(**fields: Any) -> dict[str, Any]:
    return {"name": unique_name("m"), "base_url": "http://127.0.0.1:9/v1", "model_id": "m1", **fields}


def test_create_get_list_update_delete(gateway: ChatgateServer) -> None:
    with gateway.client() as client:
        created = client.post("/api/models", json=new_model(api_key="sk-proj-secretsecret1234", description="d"))
        assert created.status_code == 201
        model = created.json()
        assert model["api_key"] == "sk-…1234"
        assert model["sharing"] == "private"
        assert model["context_length"] == 4096
        model_id = model["id"]

        assert client.get(f"/api/models/{model_id}").json() == model
        assert model_id in [m["id"] for m in client.get("/api/models").json()["data"]]

        patched = client.patch(f"/api/models/{model_id}", json={"description": "new", "context_length": 8192})
        assert patched.status_code == 200
        assert patched.json()["description"] == "new"
        assert patched.json()["context_length"] == 8192
        assert patched.json()["name"] == model["name"]
        assert patched.json()["api_key"] == "sk-…1234"

        assert client.delete(f"/api/models/{model_id}").status_code == 204
        assert client.get(f"/api/models/{model_id}").status_code == 404
        assert client.delete(f"/api/models/{model_id}").status_code == 404


@pytest.mark.parametrize(
    ("fields", "field", "limit"),
    [
        ({"name": "n" * 101}, "name", "at most 100 characters"),
        ({"description": "d" * 501}, "description", "at most 500 characters"),
        ({"model_id": "m" * 1001}, "model_id", "at most 1000 characters"),
        ({"api_key": "k" * 1001}, "api_key", "at most 1000 characters"),
        ({"base_url": "http://127.0.0.1/" + "p" * 1000}, "base_url", "at most 1000 characters"),
        ({"sharing": "everyone"}, "sharing", "'private', 'public' or 'unlisted'"),
        ({"context_length": 0}, "context_length", "greater than or equal to 1"),
        ({"name": ""}, "name", "at least 1 character"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
    ],
)
def test_validation_names_the_field_and_the_limit(
    gateway: ChatgateServer, fields: dict[str, Any], field: str, limit: str
) -> None:
    with gateway.client() as client:
        before = client.get("/api/models").json()["data"]
        response = client.post("/api/models", json=new_model(**fields))
        assert response.status_code == 422
        error = response.json()
        assert any(e["field"].endswith(field) and limit in e["message"] for e in error["errors"]), error
        assert field in error["message"]
        # Nothing half-written.
        assert client.get("/api/models").json()["data"] == before


def test_missing_required_fields_are_named(gateway: ChatgateServer) -> None:
    with gateway.client() as client:
        response = client.post("/api/models", json={"name": "x"})
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"base_url", "model_id"} <= fields


@pytest.mark.parametrize("base_url", ["ftp://example.com/v1", "not a url", "http://user:pw@example.com/v1"])
def test_base_url_must_be_http(gateway: ChatgateServer, base_url: str) -> None:
    with gateway.client() as client:
        response = client.post("/api/models", json=new_model(base_url=base_url))
    assert response.status_code in (400, 422)
    assert "base_url" in response.text


def test_failed_update_leaves_the_row_as_it_was(gateway: ChatgateServer) -> None:
    model_id = gateway.add_model(base_url="http://127.0.0.1:9/v1")
    with gateway.client() as client:
        before = client.get(f"/api/models/{model_id}").json()
        response = client.patch(f"/api/models/{model_id}", json={"name": "ok", "description": "d" * 501})
        assert response.status_code == 422
        assert client.get(f"/api/models/{model_id}").json() == before


def test_body_that_is_not_json_is_a_clear_error(gateway: ChatgateServer) -> None:
    with gateway.client() as client:
        response = client.post("/api/models", content=b"{nope", headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert "message" in response.json()


def test_a_write_reaches_the_chat_path_at_once(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    """The chat path caches models; an update through the API invalidates the entry."""
    first, second = unique_name("m"), unique_name("m")
    fake.script(first, scripts.stream("first"))
    fake.script(second, scripts.stream("second"))
    model_id = gateway.add_model(base_url=fake.base_url, model_id=first)
    chat = {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model_id}
    with gateway.client() as client:
        assert client.post("/api/chat/custom", json=chat).text == "first"
        assert client.patch(f"/api/models/{model_id}", json={"model_id": second}).status_code == 200
        assert client.post("/api/chat/custom", json=chat).text == "second"
        assert client.delete(f"/api/models/{model_id}").status_code == 204
        assert client.post("/api/chat/custom", json=chat).status_code == 404
