"""The console with chatbot-ui's Supabase session: a browser that has the `sb-…-auth-token`
cookie is signed in without a chatgate token."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest
from playwright.sync_api import Page, expect
from tests.support import ChatgateServer

pytestmark = pytest.mark.e2e

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


@pytest.fixture(scope="module")
def supabase_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    with ChatgateServer(tmp_path_factory.mktemp("console-supabase"), {"supabase_jwt_secret": SECRET}) as server:
        yield server


def test_a_supabase_session_cookie_signs_the_console_in(page: Page, supabase_server: ChatgateServer) -> None:
    sub = str(uuid.uuid4())
    claims = {"sub": sub, "aud": "authenticated", "role": "authenticated", "exp": int(time.time()) + 3600}
    session = json.dumps({"access_token": jwt.encode(claims, SECRET, algorithm="HS256"), "token_type": "bearer"})
    value = "base64-" + base64.urlsafe_b64encode(session.encode()).decode().rstrip("=")
    page.context.add_cookies([{"name": "sb-abcdefgh-auth-token", "value": value, "url": supabase_server.url}])

    page.goto(supabase_server.url + "/#/models")
    expect(page.locator("header .who")).to_have_text(f"supabase:{sub}")
    expect(page.locator("section.models .empty")).to_have_text("No models yet.")
    expect(page.locator("nav a.admin-only")).to_be_hidden()
