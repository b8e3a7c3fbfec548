"""What they may use: two users who cannot see or use each other's private models through any
endpoint; shared models usable but not manageable; admins manage all; keys always masked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tests.security.helpers import NO_SUCH_MODEL, chat_body, error_message
from tests.support import ChatgateServer, FakeUpstream, unique_name


@dataclass
class Model:
    id: str
    name: str  # the upstream model name the fake is scripted for
    key: str


@dataclass
class World:
    gateway: ChatgateServer
    fake: FakeUpstream
    alice: str
    bob: str
    admin: str
    models: dict[str, Model]  # alice's: "private", "public", "unlisted"
    paths: set[str]

    def call(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.gateway.client(token) as client:
            return client.request(method, path, **kwargs)


@pytest.fixture
def world(gateway: ChatgateServer, fake: FakeUpstream) -> World:
    alice, bob = gateway.new_user(), gateway.new_user()
    models = {}
    for sharing in ("private", "public", "unlisted"):
        name = unique_name(sharing)
        key = f"sk-alice-{sharing}-{unique_name('key')}"
        fake.script(name, STREAM)
        model_id = gateway.add_model(
            alice, name=name, base_url=fake.base_url, model_id=name, api_key=key, sharing=sharing
        )
        models[sharing] = Model(model_id, name, key)
    with gateway.client() as client:
        paths = set(client.get("/openapi.json").json()["paths"])
    return World(gateway, fake, alice, bob, gateway.admin_token, models, paths)


STREAM: dict[str, Any] = {"steps": [{"delta": "hello "}, {"delta": "there"}, {"done": True}]}


def not_found_like_a_missing_model(world: World, token: str, method: str, path: str, **kwargs: Any) -> None:
    """The answer about someone else's private model is byte for byte the one about no model."""
    real = world.call(token, method, path, **kwargs)
    ghost = world.call(token, method, path.replace(world.models["private"].id, NO_SUCH_MODEL), **kwargs)
    assert real.status_code == ghost.status_code == 404, real.text
    assert real.content == ghost.content
    assert real.headers["content-type"] == ghost.headers["content-type"]


def listed_ids(world: World, token: str) -> set[str]:
    return {m["id"] for m in world.call(token, "GET", "/api/models").json()["data"]}


def test_private_models_are_invisible_and_unusable_for_others(world: World) -> None:
    private = world.models["private"]
    path = f"/api/models/{private.id}"
    not_found_like_a_missing_model(world, world.bob, "GET", path)
    not_found_like_a_missing_model(world, world.bob, "PATCH", path, json={"name": "mine now"})
    not_found_like_a_missing_model(world, world.bob, "DELETE", path)
    not_found_like_a_missing_model(world, world.bob, "POST", "/api/chat/custom", json=chat_body(private.id))
    assert private.id not in listed_ids(world, world.bob)
    assert world.fake.requests(private.name) == []  # bob's chat never reached alice's upstream
    # Alice's model is untouched, and hers to use.
    mine = world.call(world.alice, "GET", path).json()
    assert mine["name"] == private.name
    assert private.id in listed_ids(world, world.alice)
    chat = world.call(world.alice, "POST", "/api/chat/custom", json=chat_body(private.id, private.name))
    assert (chat.status_code, chat.text) == (200, "hello there")


def test_private_models_are_invisible_on_the_openai_api_too(world: World) -> None:
    if "/v1/chat/completions" not in world.paths:
        pytest.skip("the OpenAI API is not served yet")
    private = world.models["private"]
    if "/v1/models" in world.paths:
        # /v1/models names models by their name; chats take the name or the id.
        listed = {m["id"] for m in world.call(world.bob, "GET", "/v1/models").json()["data"]}
        assert private.name not in listed and private.id not in listed
        assert world.models["public"].name in listed
        assert private.name in {m["id"] for m in world.call(world.alice, "GET", "/v1/models").json()["data"]}
    for ref in (private.id, private.name):
        body = {"model": ref, "messages": [{"role": "user", "content": "hi"}]}
        ghost_ref = NO_SUCH_MODEL if ref == private.id else unique_name("no-such")
        refused = world.call(world.bob, "POST", "/v1/chat/completions", json=body)
        ghost = world.call(world.bob, "POST", "/v1/chat/completions", json={**body, "model": ghost_ref})
        assert refused.status_code == ghost.status_code == 404
        assert error_message(refused) == error_message(ghost).replace(ghost_ref, ref)
    assert world.fake.requests(private.name) == []  # bob's chats never reached alice's upstream
    for ref in (private.id, private.name):
        body = {"model": ref, "messages": [{"role": "user", "content": "hi"}]}
        assert world.call(world.alice, "POST", "/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("sharing", ["public", "unlisted"])
def test_shared_models_are_usable_but_not_manageable_by_others(world: World, sharing: str) -> None:
    shared = world.models[sharing]
    path = f"/api/models/{shared.id}"
    seen = world.call(world.bob, "GET", path)
    assert seen.status_code == 200
    assert seen.json()["api_key"] != shared.key
    chat = world.call(world.bob, "POST", "/api/chat/custom", json=chat_body(shared.id, shared.name))
    assert (chat.status_code, chat.text) == (200, "hello there")
    # Bob spent alice's key without ever seeing it.
    (request,) = world.fake.requests(shared.name)
    assert request["headers"]["authorization"] == f"Bearer {shared.key}"
    for method, kwargs in [("PATCH", {"json": {"base_url": "http://evil.example/v1"}}), ("DELETE", {})]:
        refused = world.call(world.bob, method, path, **kwargs)
        assert refused.status_code == 404
        assert refused.json() == {"message": "Model not found"}
    assert world.call(world.alice, "GET", path).json()["base_url"] == world.fake.base_url


def test_listing_shows_own_and_public_models(world: World) -> None:
    bob_sees = listed_ids(world, world.bob)
    assert world.models["public"].id in bob_sees
    assert world.models["private"].id not in bob_sees
    assert world.models["unlisted"].id not in bob_sees  # usable by id, not listed
    assert {m.id for m in world.models.values()} <= listed_ids(world, world.alice)
    assert {m.id for m in world.models.values()} <= listed_ids(world, world.admin)


def test_admins_manage_every_model(world: World) -> None:
    private = world.models["private"]
    path = f"/api/models/{private.id}"
    changed = world.call(world.admin, "PATCH", path, json={"description": "checked by admin"})
    assert changed.status_code == 200
    assert changed.json()["description"] == "checked by admin"
    chat = world.call(world.admin, "POST", "/api/chat/custom", json=chat_body(private.id, private.name))
    assert chat.status_code == 200
    assert world.call(world.admin, "DELETE", path).status_code == 204
    assert world.call(world.alice, "GET", path).status_code == 404


def test_keys_are_masked_everywhere_for_everyone_owner_included(world: World) -> None:
    key = "sk-proj-" + unique_name("secret")
    created = world.call(
        world.alice,
        "POST",
        "/api/models",
        json={
            "name": "masked",
            "base_url": world.fake.base_url,
            "model_id": "m",
            "api_key": key,
            "sharing": "public",
        },
    )
    model_id = created.json()["id"]
    answers = [
        created,
        world.call(world.alice, "GET", f"/api/models/{model_id}"),
        world.call(world.alice, "GET", "/api/models"),
        world.call(world.alice, "PATCH", f"/api/models/{model_id}", json={"name": "masked again"}),
        world.call(world.bob, "GET", f"/api/models/{model_id}"),
        world.call(world.bob, "GET", "/api/models"),
        world.call(world.admin, "GET", "/api/models"),
    ]
    if "/v1/models" in world.paths:
        answers.append(world.call(world.bob, "GET", "/v1/models"))
    for answer in answers:
        assert answer.status_code in (200, 201)
        assert key not in answer.text
        assert key[8:-4] not in answer.text  # not even the middle of it
    assert created.json()["api_key"] == "sk-…" + key[-4:]
    shown = world.gateway.cli("models", "show", model_id)
    assert key not in shown.stdout + shown.stderr
