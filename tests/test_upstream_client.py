"""The upstream client: URLs, upstream error messages, and where it connects."""

from __future__ import annotations

import asyncio

import pytest

from chatgate.config import Settings
from chatgate.errors import BadRequest
from chatgate.security.ssrf import GuardedResolver, UpstreamPolicy
from chatgate.upstream.client import Target, UpstreamClient, chat_completions_url, error_message


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://h:1/v1", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1/", "http://h:1/v1/chat/completions"),
        ("", "https://api.openai.com/v1/chat/completions"),
        ("  ", "https://api.openai.com/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base_url: str, url: str) -> None:
    assert chat_completions_url(base_url) == url


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad key", "type": "x"}}', "bad key"),
        (b'{"error": {"message": ["a", "b"]}}', '["a","b"]'),
        (b'{"error": "model not found"}', "model not found"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', '[{"loc":["body"],"msg":"field required"}]'),
        (b'{"message": "plain message"}', "plain message"),
        (b"Bad Gateway\n", "Bad Gateway"),
        (b"", None),
        (b"{}", None),
    ],
)
def test_error_message(body: bytes, message: str | None) -> None:
    assert error_message(body) == message


class ScriptedDNS:
    """A lookup whose answers the test sets; every question is recorded."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers


async def exchange(dns: ScriptedDNS, policy: UpstreamPolicy, url: str) -> bytes:
    client = UpstreamClient(Settings(connect_timeout=2, first_byte_timeout=2), GuardedResolver(policy, dns))
    await client.start()
    try:
        response = await client.open(Target(url, ""), b"{}")
        try:
            return await response.read()
        finally:
            response.release()
    finally:
        await client.close()


def test_the_relay_connects_to_the_address_the_guard_checked() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = f"http://rebind.example:{port}/v1/chat/completions"  # not in any real DNS
        try:
            # Allowed answer: the connection goes to exactly that address (no second lookup).
            allowed = ScriptedDNS(["127.0.0.1"])
            assert await exchange(allowed, UpstreamPolicy(allow=("127.0.0.1",)), url) == b"ok"
            assert allowed.asked == ["rebind.example"]
            # The same name now answers a private address (rebinding): refused at connect time.
            rebound = ScriptedDNS(["10.0.0.7"])
            with pytest.raises(BadRequest) as refused:
                await exchange(rebound, UpstreamPolicy(allow=("127.0.0.1",)), url)
            assert refused.value.param == "base_url"
            # Cloud metadata stays refused whatever the policy.
            metadata = ScriptedDNS(["169.254.169.254"])
            with pytest.raises(BadRequest):
                await exchange(metadata, UpstreamPolicy(allow_private=True), url)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
