"""Who is calling: API tokens, Supabase tokens and cookies, the first admin, and the 401s."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.security.helpers import NO_SUCH_MODEL, db_bytes, error_message
from tests.support import ChatgateServer

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def endpoints(server: ChatgateServer) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document (so routes added later are covered too), plus the docs."""
    with server.client() as client:
        document = client.get("/openapi.json").raise_for_status().json()
    found = [("GET", "/openapi.json"), ("GET", "/docs")]
    for path, item in document["paths"].items():
        for method in item:
            found.append((method.upper(), path.replace("{model_id}", NO_SUCH_MODEL)))
    return found


def test_every_endpoint_but_healthz_and_readyz_needs_a_credential(gateway: ChatgateServer) -> None:
    operations = endpoints(gateway)
    assert ("POST", "/api/chat/custom") in operations
    with httpx.Client(base_url=gateway.url, trust_env=False) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").json() == {"status": "ready"}
        for method, path in operations:
            if path in ("/healthz", "/readyz"):
                continue
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert error_message(response) == "Missing credential: send 'Authorization: Bearer <token>'"


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("Basic YWRtaW46YWRtaW4=", "Authorization header must be 'Bearer <token>'"),
        ("Bearer", "Authorization header must be 'Bearer <token>'"),
        ("Bearer cg_" + "A" * 43, "API token is invalid or revoked"),
        ("Bearer not-a-token", "Credential is not a chatgate API token or a Supabase access token"),
        ("Bearer a.b.c", "Supabase tokens are not accepted: CHATGATE_SUPABASE_JWT_SECRET is not set"),
        ("Bearer " + "x" * 20_000, "Credential is too long"),
    ],
)
def test_401_says_what_is_wrong(gateway: ChatgateServer, authorization: str, message: str) -> None:
    for method, path in [("GET", "/api/models"), ("POST", "/api/chat/custom")]:
        response = httpx.request(
            method, gateway.url + path, headers={"Authorization": authorization}, json={}, trust_env=False
        )
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"message": message}


def test_a_near_miss_token_learns_nothing_more_than_a_random_one(gateway: ChatgateServer) -> None:
    token = gateway.new_user()
    near_miss = token[:-1] + ("A" if token[-1] != "A" else "B")
    answers = {
        httpx.get(gateway.url + "/api/models", headers=gateway.auth(t), trust_env=False).text
        for t in (near_miss, "cg_" + "Z" * 43, token[:12] + "x" * 31)
    }
    assert answers == {'{"message":"API token is invalid or revoked"}'}


def test_revocation_takes_effect_at_once(gateway: ChatgateServer) -> None:
    name = f"revokee-{uuid.uuid4().hex[:8]}"
    token = gateway.new_user(name)
    other = gateway.cli("tokens", "create", "--user", name).stdout.strip()
    with gateway.client(token) as client:
        assert client.get("/api/models").status_code == 200
    listed = gateway.cli("tokens", "list", "--user", name).stdout
    assert token not in listed and other not in listed  # only prefixes are ever shown
    assert token[:10] in listed
    revoked = gateway.cli("tokens", "revoke", token[:10])
    assert revoked.returncode == 0, revoked.stderr
    with gateway.client(token) as client:
        response = client.get("/api/models")  # the very next request
        assert response.status_code == 401
        assert response.json() == {"message": "API token is invalid or revoked"}
        chat = client.post("/api/chat/custom", json={})
        assert chat.status_code == 401
    with gateway.client(other) as client:
        assert client.get("/api/models").status_code == 200  # the user's other token still works


@pytest.mark.backends("sqlite")  # reads the database file
def test_the_database_holds_only_token_hashes(gateway: ChatgateServer) -> None:
    token = gateway.new_user()
    with gateway.client(token) as client:
        assert client.get("/api/models").status_code == 200
    stored = db_bytes(gateway)
    assert hashlib.sha256(token.encode()).hexdigest().encode() in stored
    assert token.encode() not in stored
    assert token[10:].encode() not in stored  # not even the part after the displayed prefix
    assert gateway.admin_token[10:].encode() not in stored


def test_first_start_creates_the_admin_and_shows_its_token_once(
    make_chatgate: Callable[..., ChatgateServer],
) -> None:
    server = make_chatgate()
    token_file = server.data_dir / "admin-token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token.startswith("cg_")
    log = server.log_text()
    assert log.count(token) == 1
    assert "Created the first user 'admin'" in log
    with server.client(token) as client:
        assert client.get("/api/models").status_code == 200
    server.restart()
    log = server.log_text()
    assert log.count(token) == 1, "the second start printed the token again"
    assert log.count("Created the first user") == 1
    assert token_file.read_text().strip() == token
    users = server.cli("users", "list").stdout
    assert users.count("admin") == 2  # the name and its role: one admin, created once


# ----- Supabase -------------------------------------------------------------------------------


def supabase_token(key: Any = SECRET, *, alg: str = "HS256", sub: str | None = None, **claims: Any) -> str:
    """A token as Supabase signs it; a claim given as None is left out."""
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    payload: dict[str, Any] = {"sub": sub or str(uuid.uuid4()), "aud": "authenticated", "role": "authenticated"}
    payload["exp"] = int(time.time()) + 3600
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers=headers)


@pytest.fixture(scope="module")
def supabase_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    with ChatgateServer(tmp_path_factory.mktemp("supabase"), {"supabase_jwt_secret": SECRET}) as server:
        yield server


def get_models(server: ChatgateServer, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url + "/api/models", trust_env=False, **kwargs)


def test_supabase_hs256_access_tokens(supabase_gateway: ChatgateServer) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alice_auth = {"Authorization": "Bearer " + supabase_token(sub=alice)}
    response = httpx.post(
        supabase_gateway.url + "/api/models",
        headers=alice_auth,
        json={"name": "alice's", "base_url": "http://127.0.0.1:9/v1", "model_id": "m", "api_key": "sk-alice-1234567"},
        trust_env=False,
    )
    assert response.status_code == 201, response.text
    assert response.json()["user_id"] == alice  # `sub` is the user
    assert [m["name"] for m in get_models(supabase_gateway, headers=alice_auth).json()["data"]] == ["alice's"]
    bob_auth = {"Authorization": "Bearer " + supabase_token(sub=bob)}
    assert get_models(supabase_gateway, headers=bob_auth).json()["data"] == []


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: supabase_token(exp=int(time.time()) - 3600), "token expired"),
        (lambda: supabase_token(aud="someone-else"), "token audience invalid"),
        (lambda: supabase_token(aud=None), "token audience invalid"),
        (lambda: supabase_token("another-secret-of-at-least-thirty-two-bytes"), "token signature invalid"),
        (lambda: supabase_token(sub="not-a-uuid"), "token subject invalid"),
        (lambda: supabase_token(exp=None), "token has no exp claim"),
        (lambda: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "token algorithm not accepted"),
        (lambda: "aaa.bbb.ccc", "token malformed"),
    ],
)
def test_supabase_rejections_say_what_is_wrong(
    supabase_gateway: ChatgateServer, token: Callable[[], str], message: str
) -> None:
    value = token()
    response = get_models(supabase_gateway, headers={"Authorization": "Bearer " + value})
    assert response.status_code == 401
    assert response.json() == {"message": message}
    assert value not in response.text


def session_cookie(token: str) -> str:
    return json.dumps({"access_token": token, "refresh_token": "r", "token_type": "bearer"})


def test_supabase_session_cookie_forms(supabase_gateway: ChatgateServer) -> None:
    sub = str(uuid.uuid4())
    token = supabase_token(sub=sub)
    session = session_cookie(token)
    encoded = "base64-" + base64.urlsafe_b64encode(session.encode()).decode().rstrip("=")
    half = len(encoded) // 2
    forms = [
        {"sb-abcdefgh-auth-token": session},
        {"sb-abcdefgh-auth-token": encoded},
        {"sb-abcdefgh-auth-token.1": encoded[half:], "sb-abcdefgh-auth-token.0": encoded[:half]},
    ]
    for cookies in forms:
        header = "; ".join(f"{name}={value}" for name, value in cookies.items())
        # The JSON form is sent raw, as browsers do (it holds quotes and commas).
        response = get_models(supabase_gateway, headers={"Cookie": header})
        assert response.status_code == 200, (cookies, response.text)
    bad = get_models(supabase_gateway, headers={"Cookie": "sb-x-auth-token=" + session_cookie(token + "x")})
    assert bad.status_code == 401
    assert bad.json() == {"message": "token signature invalid"}
    assert get_models(supabase_gateway, headers={"Cookie": "theme=dark"}).status_code == 401


class JWKSServer:
    """A JWKS document on loopback, as Supabase publishes at /auth/v1/.well-known/jwks.json."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/auth/v1/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, kid: str) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        self.keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return key

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_supabase_asymmetric_tokens_via_the_projects_jwks(make_chatgate: Callable[..., ChatgateServer]) -> None:
    jwks = JWKSServer()
    try:
        key = jwks.publish("key-1")
        server = make_chatgate(supabase_jwks_url=jwks.url)
        good = supabase_token(key, alg="RS256", kid="key-1")
        assert get_models(server, headers={"Authorization": "Bearer " + good}).status_code == 200
        assert get_models(server, headers={"Authorization": "Bearer " + good}).status_code == 200
        assert jwks.fetches == 1  # cached
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = supabase_token(stranger, alg="RS256", kid="key-1")
        response = get_models(server, headers={"Authorization": "Bearer " + forged})
        assert response.json() == {"message": "token signature invalid"}
        # HS256 signed with something public is never accepted when only a JWKS is configured.
        hs = supabase_token("key-1-but-as-an-hmac-secret-long-enough", kid="key-1")
        assert get_models(server, headers={"Authorization": "Bearer " + hs}).json() == {
            "message": "token algorithm not accepted"
        }
        # A refetch on an unknown kid is rate-limited (tests/test_security_supabase.py covers the
        # refresh itself with a fake clock); within that interval the kid is simply unknown.
        unknown = supabase_token(key, alg="RS256", kid="key-2")
        assert get_models(server, headers={"Authorization": "Bearer " + unknown}).json() == {
            "message": "token signing key unknown"
        }
    finally:
        jwks.close()
