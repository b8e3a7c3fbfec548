"""Supabase access tokens: HS256 and JWKS verification, key rotation, and the session cookie."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from chatgate.errors import ServiceUnavailable, Unauthorized
from chatgate.security import supabase
from chatgate.security.supabase import SupabaseVerifier, token_from_cookies

T = TypeVar("T")
SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
USER = str(uuid.uuid4())


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": USER,
        "aud": "authenticated",
        "role": "authenticated",
        "exp": int(time.time()) + 3600,
        "iat": int(time.time()),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**changes: Any) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def verify(token: str, **options: Any) -> str:
    options.setdefault("jwt_secret", SECRET)
    return run(SupabaseVerifier(**options).verify(token))


def rejection(token: str, **options: Any) -> str:
    with pytest.raises(Unauthorized) as info:
        verify(token, **options)
    assert not token or token not in info.value.message
    assert info.value.status == 401
    return info.value.message


def test_hs256_good_token_gives_the_subject() -> None:
    assert verify(hs256()) == USER


def test_hs256_rejections_say_what_is_wrong() -> None:
    assert rejection(hs256(exp=int(time.time()) - 120)) == "token expired"
    assert rejection(hs256(aud="anon")) == "token audience invalid"
    assert rejection(hs256(aud=None)) == "token audience invalid"
    assert rejection(jwt.encode(claims(), SECRET + "x", algorithm="HS256")) == "token signature invalid"
    assert rejection(hs256(sub=None)) == "token has no subject"
    assert rejection(hs256(sub="")) == "token has no subject"
    assert rejection(hs256(sub="not-a-uuid")) == "token subject invalid"
    assert rejection(hs256(exp=None)) == "token has no exp claim"
    assert rejection(hs256(nbf=int(time.time()) + 3600)) == "token not yet valid"
    assert rejection("not.a.jwt") == "token malformed"
    assert rejection("") == "token malformed"
    assert rejection("x" * 20_000) == "token malformed"


def test_leeway_tolerates_small_clock_skew() -> None:
    assert verify(hs256(exp=int(time.time()) - 5), leeway=30) == USER
    assert rejection(hs256(exp=int(time.time()) - 5), leeway=0) == "token expired"


def test_issuer_is_checked_when_configured() -> None:
    issuer = "https://ref.supabase.co/auth/v1"
    assert verify(hs256(iss=issuer), issuer=issuer) == USER
    assert rejection(hs256(iss="https://evil/auth/v1"), issuer=issuer) == "token issuer invalid"


def unsigned(header: dict[str, Any], payload: dict[str, Any], signer: bytes | None = None) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(payload)}"
    signature = b"" if signer is None else hmac.new(signer, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def test_alg_none_is_never_accepted() -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, claims())
    assert rejection(token) == "token algorithm not accepted"


def test_hs256_is_refused_when_only_a_jwks_is_configured() -> None:
    message = rejection(hs256(), jwt_secret=None, jwks_url="http://127.0.0.1:9/jwks.json")
    assert message == "token algorithm not accepted"


def test_verifier_needs_a_key_source() -> None:
    with pytest.raises(ValueError):
        SupabaseVerifier()


EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = ECAlgorithm if alg == "ES256" else RSAAlgorithm
    data: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)  # type: ignore[attr-defined]
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def signed(key: Any, kid: str, alg: str, **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm=alg, headers={"kid": kid})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


JWKS_PATH = "/auth/v1/.well-known/jwks.json"
Answer = tuple[int, dict[str, str], bytes]


@asynccontextmanager
async def jwks_server(
    document: dict[str, Any], fetches: list[float], other: dict[str, Answer] | None = None
) -> AsyncIterator[str]:
    """A Supabase auth server on 127.0.0.1 serving `document` at the JWKS path (each fetch
    recorded) and the `other` paths' fixed answers; yields the JWKS URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1].decode()
        if path == JWKS_PATH:
            fetches.append(time.monotonic())
            status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(document).encode()
        else:
            status, headers, body = (other or {}).get(path, (404, {}, b"not found"))
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        writer.close()
        # Closed before the loop ends: a transport left closing was collected in a later test
        # and failed it with an unraisable ResourceWarning.
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{JWKS_PATH}"
    finally:
        server.close()
        await server.wait_closed()


def test_jwks_verification_caching_and_kid_rotation() -> None:
    async def scenario() -> None:
        fetches: list[float] = []
        document: dict[str, Any] = {
            "keys": [
                jwk(EC_KEY, "ec-1", "ES256"),
                jwk(RSA_KEY, "rsa-1", "RS256"),
                {"kty": "oct", "k": base64.urlsafe_b64encode(SECRET.encode()).decode(), "kid": "hs"},
                {"kty": "EC", "kid": "broken"},
            ]
        }
        clock = Clock()
        async with jwks_server(document, fetches) as url:
            verifier = SupabaseVerifier(jwks_url=url, clock=clock)

            assert await verifier.verify(signed(EC_KEY, "ec-1", "ES256")) == USER
            assert await verifier.verify(signed(RSA_KEY, "rsa-1", "RS256")) == USER
            assert len(fetches) == 1  # cached

            # A key the JWKS does not (yet) have: refused, and refetched at most once per 30 s.
            rotated = signed(EC_KEY_2, "ec-2", "ES256")
            for step in (0, 31, 1, 1):
                clock.now += step
                for _ in range(3):
                    with pytest.raises(Unauthorized, match="token signing key unknown"):
                        await verifier.verify(rotated)
            assert len(fetches) == 2  # only the lookup 31 s after the first fetch went out
            document["keys"].append(jwk(EC_KEY_2, "ec-2", "ES256"))
            with pytest.raises(Unauthorized, match="token signing key unknown"):
                await verifier.verify(rotated)
            assert len(fetches) == 2
            clock.now += 30
            assert await verifier.verify(rotated) == USER
            assert len(fetches) == 3

            # A symmetric key published in the JWKS is never used.
            with pytest.raises(Unauthorized, match="token algorithm not accepted"):
                await verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "hs"}))
            # An EC key cannot verify a token that claims RS256.
            with pytest.raises(Unauthorized, match="token signing key unknown"):
                await verifier.verify(signed(RSA_KEY, "ec-1", "RS256"))
            # A token signed by another key under a known kid.
            with pytest.raises(Unauthorized, match="token signature invalid"):
                await verifier.verify(signed(EC_KEY_2, "ec-1", "ES256"))
            with pytest.raises(Unauthorized, match="token expired"):
                await verifier.verify(signed(EC_KEY, "ec-1", "ES256", exp=int(time.time()) - 120))
            with pytest.raises(Unauthorized, match="token signing key unknown"):
                await verifier.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256"))  # no kid

            # The cache expires after jwks_max_age, so revoked keys stop working.
            document["keys"] = [jwk(EC_KEY_2, "ec-2", "ES256")]
            clock.now += 601
            with pytest.raises(Unauthorized, match="token signing key unknown"):
                await verifier.verify(signed(EC_KEY, "ec-1", "ES256"))

    run(scenario())


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    # The classic algorithm confusion: HMAC keyed with the public key the attacker can read.
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = unsigned({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), signer=public_pem)

    async def scenario() -> tuple[str, str]:
        document = {"keys": [jwk(RSA_KEY, "rsa-1", "RS256")]}
        async with jwks_server(document, []) as url:
            messages = []
            for secret in (None, SECRET):
                verifier = SupabaseVerifier(jwt_secret=secret, jwks_url=url)
                with pytest.raises(Unauthorized) as info:
                    await verifier.verify(token)
                messages.append(info.value.message)
                await verifier.aclose()
            return messages[0], messages[1]

    assert run(scenario()) == ("token algorithm not accepted", "token signature invalid")


def test_unreachable_jwks_is_a_service_error() -> None:
    async def scenario() -> None:
        verifier = SupabaseVerifier(jwks_url="http://127.0.0.1:9/jwks.json")
        try:
            with pytest.raises(ServiceUnavailable):
                await verifier.verify(signed(EC_KEY, "ec-1", "ES256"))
        finally:
            await verifier.aclose()

    run(scenario())


def jwks_fetch(path: str, other: dict[str, Answer]) -> tuple[str | None, list[float]]:
    """Verify a JWKS-signed token with the JWKS URL at `path` of a server that also answers
    `other`: (the subject, or None when the keys could not be fetched; the JWKS fetches)."""

    async def scenario() -> tuple[str | None, list[float]]:
        fetches: list[float] = []
        document = {"keys": [jwk(EC_KEY, "ec-1", "ES256")]}
        async with jwks_server(document, fetches, other) as url:
            verifier = SupabaseVerifier(jwks_url=url.replace(JWKS_PATH, path))
            try:
                return await verifier.verify(signed(EC_KEY, "ec-1", "ES256")), fetches
            except ServiceUnavailable:
                return None, fetches

    return run(scenario())


def test_jwks_redirects_are_followed_only_to_http() -> None:
    moved: Answer = (302, {"Location": JWKS_PATH}, b"")
    subject, fetches = jwks_fetch("/moved", {"/moved": moved})
    assert (subject, len(fetches)) == (USER, 1)
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/jwks.json", "data:,{}"):
        assert jwks_fetch("/moved", {"/moved": (302, {"Location": target}, b"")}) == (None, [])


def test_jwks_errors_and_oversized_documents_are_a_service_error() -> None:
    huge = json.dumps({"keys": [], "pad": "x" * (2 << 20)}).encode()
    assert jwks_fetch("/huge", {"/huge": (200, {}, huge)})[0] is None
    assert jwks_fetch("/broken", {"/broken": (200, {}, b"{not json")})[0] is None
    assert jwks_fetch("/down", {"/down": (500, {}, b"{}")})[0] is None


def test_a_hung_jwks_server_is_a_service_error_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supabase, "_JWKS_TIMEOUT", 0.5)

    async def scenario() -> float:
        writers: list[asyncio.StreamWriter] = []

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)  # accepts, never answers

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        verifier = SupabaseVerifier(jwks_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/jwks.json")
        started = time.monotonic()
        try:
            with pytest.raises(ServiceUnavailable):
                await verifier.verify(signed(EC_KEY, "ec-1", "ES256"))
            return time.monotonic() - started
        finally:
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            server.close()
            await server.wait_closed()

    assert run(scenario()) < 2.0


def b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


SESSION = json.dumps({"access_token": "the-access-token", "refresh_token": "r", "user": {"id": USER}})


def test_cookie_plain_json() -> None:
    assert token_from_cookies({"sb-abcd-auth-token": SESSION}) == "the-access-token"


def test_cookie_base64_prefixed_without_padding() -> None:
    for extra in ("", "x", "xy"):  # every padding length
        value = json.dumps({"access_token": "tok" + extra})
        assert token_from_cookies({"sb-ref-auth-token": "base64-" + b64url(value)}) == "tok" + extra


def test_cookie_chunks_are_joined_in_numeric_order() -> None:
    value = "base64-" + b64url(json.dumps({"access_token": "chunked-token", "pad": "x" * 9000}))
    size = len(value) // 11 + 1
    parts = [value[i : i + size] for i in range(0, len(value), size)]
    assert len(parts) >= 11  # so ".10" must sort after ".9"
    cookies = {f"sb-ref-auth-token.{i}": part for i, part in reversed(list(enumerate(parts)))}
    cookies["other"] = "x"
    assert token_from_cookies(cookies) == "chunked-token"
    del cookies["sb-ref-auth-token.1"]
    assert token_from_cookies(cookies) is None


def test_cookie_older_array_and_percent_encoded_forms() -> None:
    array = json.dumps(["array-token", "refresh", None, None, None])
    assert token_from_cookies({"sb-ref-auth-token": array}) == "array-token"
    encoded = "%5B%22enc-token%22%2C%22refresh%22%5D"
    assert token_from_cookies({"sb-ref-auth-token": encoded}) == "enc-token"
    legacy = json.dumps({"currentSession": {"access_token": "v1-token"}, "expiresAt": 1})
    assert token_from_cookies({"sb-ref-auth-token": legacy}) == "v1-token"


@pytest.mark.parametrize(
    "cookies",
    [
        {},
        {"session": SESSION},
        {"sb-ref-auth-token-code-verifier": SESSION},
        {"sb-ref-auth-token": "not json"},
        {"sb-ref-auth-token": "base64-@@@"},
        {"sb-ref-auth-token": "base64-" + b64url("not json")},
        {"sb-ref-auth-token": json.dumps({"refresh_token": "r"})},
        {"sb-ref-auth-token": json.dumps({"access_token": 5})},
        {"sb-ref-auth-token": json.dumps({"access_token": ""})},
        {"sb-ref-auth-token": json.dumps([])},
        {"sb-ref-auth-token": json.dumps("string")},
        {"sb-ref-auth-token.1": SESSION},
    ],
)
def test_cookie_malformed_gives_none(cookies: dict[str, str]) -> None:
    assert token_from_cookies(cookies) is None
