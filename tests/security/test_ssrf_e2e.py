"""Where chatgate will connect: every SSRF trick refused through a server with the default
policy, at write time (the API) and at connect time (rows that never passed the API).

Redirects are not followed: tests/e2e/test_chat_custom.py::test_redirects_are_not_followed
(a 307 to the metadata address is answered 502, not followed).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from tests.security.helpers import chat, insert_model_row
from tests.support import ChatgateServer, FakeUpstream, unique_name

from chatgate.config import Settings
from chatgate.errors import BadRequest
from chatgate.security.ssrf import GuardedResolver, UpstreamPolicy
from chatgate.upstream.client import Target, UpstreamClient


class FlippingDNS:
    """A DNS server under an attacker's control: each lookup gets the next answer."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return [self.answers[min(len(self.lookups), len(self.answers)) - 1]]


# Each is refused at write time whatever the port; "{port}" is the fake upstream's, which
# really listens on 127.0.0.1, so a connection that got through would be seen.
TRICKS = [
    "http://127.0.0.1:{port}/v1",
    "http://localhost:{port}/v1",  # a DNS name that resolves to loopback
    "http://2130706433:{port}/v1",  # decimal
    "http://0177.0.0.1:{port}/v1",  # octal
    "http://0x7f.0.0.1:{port}/v1",  # hex
    "http://0x7f000001:{port}/v1",
    "http://0x7f.1:{port}/v1",  # short forms
    "http://127.1:{port}/v1",
    "http://0:{port}/v1",  # "0" is 0.0.0.0, which Linux connects to loopback
    "http://0.0.0.0:{port}/v1",
    "http://[::1]:{port}/v1",
    "http://[::ffff:127.0.0.1]:{port}/v1",  # IPv4-mapped IPv6
    "http://[::ffff:7f00:1]:{port}/v1",
    "http://[::127.0.0.1]:{port}/v1",  # IPv4-compatible
    "http://[64:ff9b::7f00:1]:{port}/v1",  # NAT64
    "http://[::]:{port}/v1",
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://[fd00:ec2::254]/latest/meta-data",
    "http://[::ffff:169.254.169.254]/latest",
    "http://[fe80::1]/v1",  # link-local
    "http://10.0.0.1/v1",  # private
    "http://172.16.0.1/v1",
    "http://192.168.1.1/v1",
    "http://100.64.0.1/v1",  # shared (CGNAT)
    "http://[fc00::1]/v1",
    "http://224.0.0.1/v1",  # multicast
    "http://[ff02::1]/v1",
    "http://240.0.0.1/v1",  # reserved
    "http://255.255.255.255/v1",
]
NOT_HTTP = ["ftp://example.com/v1", "file:///etc/passwd", "gopher://127.0.0.1:70/", "http://user:pw@example.com/v1"]


@pytest.fixture(scope="module")
def default_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """A server with the default policy: private and loopback upstreams refused."""
    with ChatgateServer(tmp_path_factory.mktemp("ssrf"), {"allow_private_upstreams": False}) as server:
        yield server


@pytest.mark.parametrize("url", TRICKS + NOT_HTTP)
def test_write_time_refusal(default_policy: ChatgateServer, fake: FakeUpstream, url: str) -> None:
    url = url.format(port=fake.process.port if fake.process else 1)
    with default_policy.client() as client:
        created = client.post("/api/models", json={"name": "x", "base_url": url, "model_id": "m"})
        assert created.status_code in (400, 422), (url, created.text)
        assert "base_url" in created.json()["message"]
        model_id = default_policy.add_model(base_url="")  # OpenAI: public, and needs no DNS here
        patched = client.patch(f"/api/models/{model_id}", json={"base_url": url})
        assert patched.status_code in (400, 422)
        assert "base_url" in patched.json()["message"]


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://[fd00:ec2::254]/", "http://[fe80::1]/"])
def test_metadata_stays_blocked_when_private_networks_are_allowed(gateway: ChatgateServer, url: str) -> None:
    with gateway.client() as client:  # the test gateway allows private upstreams
        response = client.post("/api/models", json={"name": "x", "base_url": url, "model_id": "m"})
    assert response.status_code == 400
    assert "does not connect to" in response.json()["message"]


CONNECT_TRICKS = [
    "http://127.0.0.1:{port}/v1",
    "http://localhost:{port}/v1",
    "http://2130706433:{port}/v1",
    "http://0x7f.1:{port}/v1",
    "http://0177.0.0.1:{port}/v1",
    "http://0:{port}/v1",
    "http://[::ffff:127.0.0.1]:{port}/v1",
]


@pytest.mark.parametrize("url", CONNECT_TRICKS)
def test_connect_time_refusal_of_rows_that_never_passed_the_api(
    default_policy: ChatgateServer, fake: FakeUpstream, url: str
) -> None:
    assert fake.process is not None
    name = unique_name("ssrf")
    fake.script(name, {"steps": [{"delta": "should never be sent"}, {"done": True}]})
    model_id = insert_model_row(default_policy, base_url=url.format(port=fake.process.port), model_id=name)
    response = chat(default_policy, None, model_id, name)
    assert response.status_code == 400, response.text
    assert "does not connect to" in response.json()["message"]
    assert fake.requests(name) == []  # refused, not connected


def test_the_same_row_connects_when_the_policy_allows_it(
    default_policy: ChatgateServer, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The control for the test above: a server with private upstreams allowed, on the same
    database, does reach the fake with such a row, so "no request" there means "refused"."""
    assert fake.process is not None
    name = unique_name("ssrf")
    fake.script(name, {"steps": [{"delta": "reached"}, {"done": True}]})
    model_id = insert_model_row(default_policy, base_url=f"http://127.0.0.1:{fake.process.port}/v1", model_id=name)
    skip = ("CHATGATE_PORT", "CHATGATE_ALLOW_PRIVATE_UPSTREAMS")
    env = {k: v for k, v in default_policy.env.items() if k not in skip}
    with ChatgateServer(default_policy.data_dir, {**env, "allow_private_upstreams": True}) as permissive:
        assert chat(permissive, default_policy.admin_token, model_id, name).text == "reached"
    assert len(fake.requests(name)) == 1


async def _served_through(resolver: GuardedResolver, host: str) -> list[str]:
    """Two chats to http://host/ through the relay's client guarded by `resolver` (a fresh pool
    each, so each looks the name up), against a server on 127.0.0.1: the Host headers served."""
    hits: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hits.extend(line[6:].decode() for line in head.split(b"\r\n") if line.lower().startswith(b"host: "))
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):
            client = UpstreamClient(Settings(connect_timeout=2, first_byte_timeout=2), resolver)
            await client.start()
            try:
                response = await client.open(Target(f"http://{host}:{port}/v1/chat/completions", ""), b"{}")
                await response.read()
                response.release()
            except BadRequest:
                pass
            finally:
                await client.close()
    finally:
        server.close()
        await server.wait_closed()
    return hits


def test_dns_rebinding_connects_only_to_the_checked_address() -> None:
    # "rebind.test" exists only in this lookup: the first answer is allowed (127.0.0.1 is on
    # the allow-list here), the second flips to the metadata address.
    inner = FlippingDNS(["127.0.0.1", "169.254.169.254"])
    guard = GuardedResolver(UpstreamPolicy(allow=("127.0.0.1/32",)), inner)
    hits = asyncio.run(_served_through(guard, "rebind.test"))
    # The first chat reached the address the guard checked; the OS cannot resolve
    # "rebind.test", so the relay made no second, unchecked lookup. The flipped answer was refused.
    assert len(hits) == 1 and hits[0].startswith("rebind.test:")
    assert inner.lookups == ["rebind.test", "rebind.test"]
    with pytest.raises(OSError):
        socket.getaddrinfo("rebind.test", 80)
