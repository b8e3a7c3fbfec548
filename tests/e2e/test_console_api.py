"""The console's server side through real processes: the session cookie (sign in, CSRF, sign
out, revocation), the accounts and usage-summary endpoints, and how the static files are served."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest
from tests.security.helpers import db_bytes
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name, wait_until

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]


def sign_in(server: ChatgateServer, token: str | None = None) -> tuple[str, httpx.Response]:
    """The session cookie's value for a fresh sign-in, and the response that set it."""
    response = httpx.post(server.url + "/api/session", headers=server.auth(token), trust_env=False)
    assert response.status_code == 200, response.text
    match = re.match(r"chatgate_session=([^;]+)", response.headers["set-cookie"])
    assert match is not None
    return match.group(1), response


def with_cookie(server: ChatgateServer, secret: str, origin: str | None = "same") -> httpx.Client:
    """A browser's request as the console makes it: the cookie, and an Origin on writes."""
    headers = {"Cookie": f"chatgate_session={secret}"}
    if origin is not None:
        headers["Origin"] = server.url if origin == "same" else origin
    return httpx.Client(base_url=server.url, headers=headers, trust_env=False, timeout=30.0)


def test_sign_in_sets_a_strict_httponly_cookie_that_the_chat_routes_accept(
    gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    name = unique_name("cookie")
    fake.script(name, scripts.stream("Hello", " there"))
    model_id = gateway.add_model(base_url=fake.base_url, model_id=name)
    secret, response = sign_in(gateway)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain HTTP on loopback; Secure when the request came over TLS
    assert response.json()["name"] == "admin" and response.json()["is_admin"] is True
    assert gateway.admin_token not in response.text

    with with_cookie(gateway, secret) as browser:
        assert browser.get("/api/session").json()["name"] == "admin"
        assert model_id in [m["id"] for m in browser.get("/api/models").json()["data"]]
        streamed = browser.post("/v1/chat/completions", json={"model": model_id, "messages": MESSAGES, "stream": True})
        assert streamed.status_code == 200
        assert '"Hello"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        custom = browser.post(
            "/api/chat/custom",
            json={"chatSettings": {"model": name}, "messages": MESSAGES, "customModelId": model_id},
        )
        assert custom.status_code == 200 and custom.text == "Hello there"


def test_the_cookie_is_secure_when_the_browser_came_over_tls(gateway: ChatgateServer) -> None:
    """chatgate itself speaks plain HTTP: TLS is a proxy's, which says so in X-Forwarded-Proto."""
    headers = {**gateway.auth(), "X-Forwarded-Proto": "https"}
    response = httpx.post(gateway.url + "/api/session", headers=headers, trust_env=False)
    assert response.status_code == 200
    assert "; secure" in response.headers["set-cookie"].lower()


@pytest.mark.parametrize("origin", [None, "http://evil.example", "http://127.0.0.1:1"])
def test_a_write_with_the_cookie_from_another_origin_is_refused(
    gateway: ChatgateServer, fake: FakeUpstream, origin: str | None
) -> None:
    name = unique_name("csrf")
    fake.script(name, scripts.stream("never"))
    model_id = gateway.add_model(base_url=fake.base_url, model_id=name)
    secret, _ = sign_in(gateway)
    with with_cookie(gateway, secret, origin) as browser:
        chat = browser.post("/v1/chat/completions", json={"model": model_id, "messages": MESSAGES, "stream": True})
        assert chat.status_code == 403
        assert chat.json()["error"]["type"] == "permission_error"
        created = browser.post("/api/models", json={"name": name, "base_url": fake.base_url, "model_id": name})
        assert created.status_code == 403
        assert created.json()["message"].startswith("Cross-origin request refused")
        assert browser.delete(f"/api/models/{model_id}").status_code == 403
        assert browser.get("/api/models").status_code == 200  # reads are not state changes
    assert fake.requests(name) == []  # nothing reached the model
    with gateway.client() as client:
        assert client.get(f"/api/models/{model_id}").status_code == 200


def test_an_authorization_header_wins_over_the_cookie(gateway: ChatgateServer) -> None:
    """The cookie is looked at only when there is no Authorization header (the API's hot path
    never parses cookies), so a dead session cookie does not spoil an API client's request."""
    headers = {**gateway.auth(), "Cookie": "chatgate_session=ended-long-ago"}
    assert httpx.get(gateway.url + "/api/models", headers=headers, trust_env=False).status_code == 200
    anonymous = httpx.get(gateway.url + "/api/models", headers={"Cookie": "chatgate_session=x"}, trust_env=False)
    assert anonymous.status_code == 401
    assert anonymous.json()["message"] == "Session has ended: sign in again"


def test_sign_out_ends_the_session_on_the_server(gateway: ChatgateServer) -> None:
    secret, _ = sign_in(gateway)
    with with_cookie(gateway, secret) as browser:
        out = browser.delete("/api/session")
        assert out.status_code == 204
        assert re.match(r'chatgate_session="?"?;', out.headers["set-cookie"])  # cleared in the browser
        # ... and dead on the server: a copy of the cookie is worth nothing.
        assert browser.get("/api/session").status_code == 401
        assert browser.get("/api/models").status_code == 401


def test_revoking_the_token_ends_the_sessions_it_opened(gateway: ChatgateServer) -> None:
    token = gateway.new_user()
    secret, _ = sign_in(gateway, token)
    with with_cookie(gateway, secret) as browser:
        assert browser.get("/api/session").status_code == 200
        (mine,) = browser.get("/api/tokens").json()["data"]
        assert browser.delete(f"/api/tokens/{mine['id']}").json()["revoked_at"] is not None
        assert browser.get("/api/session").status_code == 401


def test_sign_in_needs_a_chatgate_api_token(gateway: ChatgateServer) -> None:
    url = gateway.url + "/api/session"
    assert httpx.post(url, trust_env=False).status_code == 401
    revoked = httpx.post(url, headers={"Authorization": "Bearer cg_nope"}, trust_env=False)
    assert revoked.status_code == 401 and "set-cookie" not in revoked.headers
    # A session cannot open another (its cookie is not a token).
    secret, _ = sign_in(gateway)
    with with_cookie(gateway, secret) as browser:
        again = browser.post("/api/session")
        assert again.status_code == 400 and "set-cookie" not in again.headers


@pytest.mark.backends("sqlite")
def test_the_session_id_is_stored_only_as_its_hash(gateway: ChatgateServer) -> None:
    secret, _ = sign_in(gateway)
    stored = db_bytes(gateway)
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


def test_a_user_manages_their_own_tokens_and_only_an_admin_manages_users(gateway: ChatgateServer) -> None:
    user = unique_name("member")
    with gateway.client() as admin:
        assert admin.post("/api/users", json={"name": user}).status_code == 201
        assert admin.post("/api/users", json={"name": user}).status_code == 400  # taken
        assert admin.post("/api/users", json={"name": "bad\nname"}).status_code == 422
        created = admin.post("/api/tokens", json={"user": user})
        assert created.status_code == 201
        token = created.json()["token"]
        assert token.startswith("cg_") and created.json()["prefix"] == token[:10]
        assert token not in admin.get("/api/tokens").text  # shown once: listed by prefix only
        admin_tokens = [t["id"] for t in admin.get("/api/tokens").json()["data"] if t["user"] == "admin"]
    with gateway.client(token) as member:
        assert member.get("/api/users").status_code == 404
        assert member.post("/api/users", json={"name": unique_name("x")}).status_code == 404
        assert member.post("/api/tokens", json={"user": "admin"}).status_code == 404
        assert {t["user"] for t in member.get("/api/tokens").json()["data"]} == {user}
        assert member.delete(f"/api/tokens/{admin_tokens[0]}").status_code == 404
        second = member.post("/api/tokens", json={})
        assert second.status_code == 201 and second.json()["user"] == user
    with gateway.client() as admin:
        assert admin.get("/api/session").status_code == 200  # the admin's tokens all still work


def test_the_usage_summary_is_a_users_own_unless_admin(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    token = gateway.new_user()
    name = unique_name("summary")
    fake.script(name, scripts.stream("a", "b"))
    model_id = gateway.add_model(token, base_url=fake.base_url, model_id=name, name=name)
    with gateway.client(token) as member:
        for _ in range(3):
            body = {"model": model_id, "messages": MESSAGES, "stream": True}
            assert member.post("/v1/chat/completions", json=body).status_code == 200

        def mine() -> list[dict[str, object]]:
            return [row for row in member.get("/api/usage/summary").json()["data"] if row["model"] == name]

        (row,) = wait_until(lambda: mine() if mine() and mine()[0]["requests"] == 3 else None)
        assert row["errors"] == 0 and row["ttfb_p50"] is not None
        assert {r["model"] for r in member.get("/api/usage/summary").json()["data"]} == {name}
    with gateway.client() as admin:
        assert name in {r["model"] for r in admin.get("/api/usage/summary").json()["data"]}


@pytest.mark.backends("sqlite")
def test_the_console_page_and_files_are_served_with_csp_cache_headers_and_gzip(gateway: ChatgateServer) -> None:
    with httpx.Client(base_url=gateway.url, trust_env=False) as browser:
        page = browser.get("/", headers={"Accept-Encoding": "gzip"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert '<script src="/console/app/main.js" type="module">' in page.text
        assert "<script>" not in page.text and "style=" not in page.text  # nothing inline

        app = browser.get("/console/app/chat.js", headers={"Accept-Encoding": "gzip"})
        assert app.headers["content-encoding"] == "gzip" and app.headers["vary"] == "Accept-Encoding"
        assert app.headers["content-type"].startswith("text/javascript")
        assert int(app.headers["content-length"]) < len(app.content)  # httpx decoded it
        assert browser.get("/console/app/chat.js", headers={"Accept-Encoding": "identity"}).content == app.content
        again = browser.get("/console/app/chat.js", headers={"If-None-Match": app.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

        vendor = browser.get("/console/vendor/dompurify-3.5.0/purify.es.mjs")
        assert vendor.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert vendor.headers["content-type"].startswith("text/javascript")
        assert browser.get("/console/vendor/dompurify-3.5.0/LICENSE").status_code == 200
        assert browser.get("/console/nothing.js").status_code == 404
        assert browser.get("/console/../pyproject.toml").status_code == 404
