"""The SSRF guard: address classes, URL parsing, write-time checks, and a real guarded connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from ipaddress import ip_address
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.config import DEFAULT_BASE_URL, Settings
from chatgate.errors import BadRequest
from chatgate.security.ssrf import (
    BlockedAddress,
    GuardedResolver,
    UpstreamPolicy,
    check_address,
    check_literal_host,
    check_url,
    effective_base_url,
    literal_ip,
    parse_base_url,
    system_lookup,
)
from chatgate.upstream.client import Target, UpstreamClient, chat_completions_url
from chatgate.upstream.http11 import endpoint

T = TypeVar("T")
DEFAULT = UpstreamPolicy()
PRIVATE_OK = UpstreamPolicy(allow_private=True)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def blocked(address: str, policy: UpstreamPolicy = DEFAULT, host: str | None = None) -> bool:
    try:
        check_address(ip_address(address), host or address, policy)
    except BadRequest as exc:
        assert exc.param == "base_url"
        return True
    return False


ALWAYS_BLOCKED = [
    "169.254.169.254",  # AWS/GCP/Azure metadata
    "169.254.1.1",
    "fe80::1",
    "fe80::1%1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "100.100.100.200",  # Alibaba metadata
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::169.254.169.254",  # IPv4-compatible
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "::ffff:0.0.0.0",
    "::ffff:224.0.0.1",
]
PRIVATE = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # shared address space (carrier-grade NAT, Tailscale)
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "::ffff:0:127.0.0.1",  # IPv4-translated
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "64:ff9b::7f00:1",  # NAT64 well-known prefix
    "64:ff9b:1:7f00:0:100::",  # NAT64 local-use /48 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]
RESERVED = ["240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "2001:db8::1"]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "104.18.0.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::",
]


@pytest.mark.parametrize("address", ALWAYS_BLOCKED + PRIVATE + RESERVED)
def test_default_policy_blocks(address: str) -> None:
    assert blocked(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert not blocked(address)


@pytest.mark.parametrize("address", PRIVATE)
def test_allow_private_allows_loopback_and_private(address: str) -> None:
    assert not blocked(address, PRIVATE_OK)


@pytest.mark.parametrize("address", ALWAYS_BLOCKED + RESERVED)
def test_allow_private_keeps_metadata_link_local_and_special_blocked(address: str) -> None:
    assert blocked(address, PRIVATE_OK)


@pytest.mark.parametrize("address", ALWAYS_BLOCKED)
def test_no_allow_list_unblocks_link_local_or_metadata(address: str) -> None:
    everything = UpstreamPolicy(True, ("0.0.0.0/0", "::/0", "169.254.0.0/16", "fd00:ec2::/32", address))
    assert blocked(address, everything, host="metadata.internal")
    named = UpstreamPolicy(True, ("metadata.internal",))
    assert blocked(address, named, host="metadata.internal")


def test_cidr_allow_list_matches_only_its_range() -> None:
    policy = UpstreamPolicy.from_settings(False, " 10.1.0.0/16 , fd00:1::/32,")
    assert not blocked("10.1.2.3", policy)
    assert not blocked("::ffff:10.1.2.3", policy)
    assert not blocked("fd00:1::5", policy)
    assert blocked("10.2.0.1", policy)
    assert blocked("127.0.0.1", policy)
    assert blocked("fd00:2::5", policy)


def test_hostname_allow_list_matches_only_that_host() -> None:
    policy = UpstreamPolicy.from_settings(False, "Models.LAN.,*.gpu.internal")
    assert not blocked("192.168.1.5", policy, host="models.lan")
    assert not blocked("192.168.1.5", policy, host="models.lan.")
    assert not blocked("127.0.0.1", policy, host="a.gpu.internal")
    assert blocked("192.168.1.5", policy, host="other.lan")
    assert blocked("192.168.1.5", policy, host="gpu.internal")
    assert blocked("192.168.1.5", policy, host="evilgpu.internal")


def test_error_names_the_host_but_not_the_resolved_address() -> None:
    with pytest.raises(BadRequest) as info:
        check_address(ip_address("10.0.0.7"), "models.example", DEFAULT)
    assert "models.example" in info.value.message
    assert "resolves to a private address" in info.value.message
    assert "10.0.0.7" not in info.value.message
    assert "CHATGATE_ALLOW_PRIVATE_UPSTREAMS" in info.value.message
    with pytest.raises(BadRequest) as info:
        check_address(ip_address("169.254.169.254"), "169.254.169.254", PRIVATE_OK)
    assert "is a cloud metadata address" in info.value.message
    assert "CHATGATE_ALLOW_PRIVATE_UPSTREAMS" not in info.value.message


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("[::1]", "::1"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("0x7g.1", None),
    ],
)
def test_literal_ip_reads_every_numeric_form(host: str, address: str | None) -> None:
    found = literal_ip(host)
    assert (str(found) if found is not None else None) == address


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "http://localhost:8080/v1/",
        "http://[::1]:8000",
        "https://xn--bcher-kva.example/v1",
        "https://bücher.example/v1",
        "HTTP://Models.Example:8080/V1",
        "  http://models.example/v1  ",
        "http://[2001:db8::1]/v1",
        "http://models.example./v1",
        "http://models.example:65535",
    ],
)
def test_parse_base_url_accepts_and_agrees_with_the_relay(url: str) -> None:
    # What the relay (upstream/http11.py) connects to is what was checked: same host, same port.
    parsed = parse_base_url(url)
    relayed = endpoint(chat_completions_url(url))
    assert (parsed.scheme, parsed.port) == (relayed.scheme, relayed.port)
    assert parsed.host == relayed.host.encode("idna").decode("ascii")


# Pieces of hostile URLs: separators every parser treats differently, IPv6 brackets, an IDNA
# name, fullwidth and ideographic dots, whitespace and control characters.
_PIECES = st.sampled_from(
    [
        *("http://", "https://", "a", "b.example", "0x7f", "1", ".", ":", "80", "/", "@", "[", "]", "::1"),
        *("\\", "%", "%2e", "?", "#", " ", "\t", "\n", "ü", "\u3002", "\uff0e", "\uff10", "[::ffff:127.0.0.1]", "v1"),
    ]
)
# Plausible base URLs (most of them valid), so that accepted ones are tested too.
_PLAUSIBLE = st.tuples(
    st.sampled_from(["http://", "https://", "HTTP://"]),
    st.sampled_from(["b.example", "Bücher.example", "b.example.", "[::1]", "[2001:DB8::1]", "127.0.0.1", "a_b.lan"]),
    st.sampled_from(["", ":80", ":8080", ":65535", ":0", ":\u0668\u0660", ":"]),
    st.sampled_from(["", "/", "/v1", "/v1/", "/a%2Fb", "/v\u00e9", "/v 1"]),
).map("".join)


def _with_a_piece(draw: st.DrawFn) -> str:
    url = draw(_PLAUSIBLE)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(url)))
        url = url[:at] + draw(_PIECES) + url[at:]
    return url


_URLS = st.one_of(st.lists(_PIECES, min_size=1, max_size=12).map("".join), st.composite(_with_a_piece)())


@settings(max_examples=400, deadline=None)
@given(_URLS)
def test_an_accepted_url_means_the_same_host_to_the_relay(url: str) -> None:
    """Whatever parse_base_url accepts, the relay's own parser reads alike (same scheme, host and
    port); anything else is refused with a BadRequest, never another exception."""
    try:
        parsed = parse_base_url(url)
    except BadRequest as exc:
        assert exc.param == "base_url"
        return
    relayed = endpoint(chat_completions_url(url))
    assert (parsed.scheme, parsed.port) == (relayed.scheme, relayed.port)
    assert parsed.host == relayed.host.encode("idna").decode("ascii")


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://bücher.example/v1", "xn--bcher-kva.example", 443),
        ("HTTP://Models.Example:8080/V1", "models.example", 8080),
        ("http://[2001:DB8::1]:81/", "2001:db8::1", 81),
    ],
)
def test_parse_base_url_host_is_the_ascii_form(url: str, host: str, port: int) -> None:
    parsed = parse_base_url(url)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://example.com/", "http"),
        ("file:///etc/passwd", "http"),
        ("example.com/v1", "http"),
        ("", "http"),
        ("http:///v1", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://%31%32%37.0.0.1/", "invalid host"),
        ("http://[fe80::1%25eth0]/", "invalid host"),
        # Where URL parsers disagree (urlsplit here and in the relay, WHATWG in browsers and
        # chatbot-ui, yarl, curl): refused, so no reader of the stored URL connects elsewhere.
        ("http://a@b@c.example/", "credentials"),  # urlsplit: host c.example, user "a@b"
        ("http://@models.example/", "credentials"),  # empty userinfo
        ("http://good.example:80@evil.example/", "credentials"),
        ("http://evil.example\\@good.example/", "backslashes"),  # WHATWG: evil.example
        ("http://good.example\\.evil.example/", "backslashes"),
        ("http:\\\\evil.example/", "backslashes"),
        ("http://ex ample.com/", "spaces"),
        ("http://exa\tmple.com/", "spaces"),  # urlsplit silently drops tabs and newlines
        ("http://example.com/v1\r\nX-Injected: 1", "spaces"),
        ("http://example.com/v 1", "spaces"),  # would break the request line
        ("http://\x00example.com/", "control"),
        ("http://[::1", "not a valid URL"),
        ("http://[::1]x/", "invalid port"),  # urlsplit ignores what follows "]"
        ("http://[127.0.0.1]/", "not a valid URL"),
        ("http://[::1]]/", "invalid port"),
        ("http://example.com:80:90/", "invalid port"),
        ("http://example.com:/", "invalid port"),
        ("http://example.com:+80/", "invalid port"),
        ("http://example.com:٨٠/", "invalid port"),  # Arabic-Indic digits, which int() reads
        ("http://example.com:0/", "invalid port"),
        ("http://example.com:65536/", "invalid port"),
        ("http://127\u30020\u30020\u30021/", "invalid host"),  # the IDNA codec reads 127.0.0.1
        ("http://.b.example/", "invalid host"),  # an empty label: no Host header can carry it
        ("http://%s.example/" % ("a" * 64), "invalid host"),  # a label over 63 characters
        ("http://good.example#@evil.example/", "fragment"),
        ("http://good.example?@evil.example/", "query"),
        ("http://good.example/v1?api-version=1", "query"),
        ("http://models.example/vé", "ASCII"),
        ("http:/models.example/v1", "http://"),
        ("http:models.example", "http://"),
    ],
)
def test_parse_base_url_refuses(url: str, complaint: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_base_url(url)
    assert info.value.param == "base_url"
    assert complaint in info.value.message


def test_effective_base_url() -> None:
    assert effective_base_url("") == DEFAULT_BASE_URL
    assert effective_base_url("  ") == DEFAULT_BASE_URL
    assert effective_base_url("http://x:1/v1/") == "http://x:1/v1/"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/v1",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://0/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]:11434/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://localhost:8080/v1",
        "http://LOCALHOST:8080/v1",
    ],
)
def test_check_url_refuses_numeric_tricks_and_local_names(url: str) -> None:
    with pytest.raises(BadRequest) as info:
        run(check_url(url, DEFAULT))
    assert info.value.param == "base_url"
    assert "does not connect" in info.value.message


def test_check_url_with_allow_private() -> None:
    run(check_url("http://127.0.0.1:8080/v1", PRIVATE_OK))
    run(check_url("http://localhost:8080/v1", PRIVATE_OK))
    run(check_url("http://[::1]:8080/v1", PRIVATE_OK))
    with pytest.raises(BadRequest, match=r"must be written as 127\.0\.0\.1"):
        run(check_url("http://2130706433/", PRIVATE_OK))
    with pytest.raises(BadRequest, match="metadata"):
        run(check_url("http://169.254.169.254/", PRIVATE_OK))


def test_check_url_allows_an_allow_listed_name() -> None:
    run(check_url("http://localhost:8080/v1", UpstreamPolicy(allow=("localhost",))))


def test_check_url_empty_means_openai_and_does_not_resolve() -> None:
    dns = FakeDNS({})
    run(check_url("", DEFAULT, lookup=dns))
    assert dns.lookups == []


def test_check_url_unresolvable_host() -> None:
    with pytest.raises(BadRequest, match="cannot be resolved") as info:
        run(check_url("http://no-such-host.invalid/v1", DEFAULT))
    assert info.value.param == "base_url"


class FakeDNS:
    """A lookup answering from a table; each name maps to a list of answers, one per successive lookup."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        queue = self.answers.get(host)
        if not queue:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return queue.pop(0) if len(queue) > 1 else queue[0]


def test_check_url_refuses_when_any_address_is_refused() -> None:
    resolver = FakeDNS({"mixed.example": [["93.184.216.34", "10.0.0.1"]], "ok.example": [["93.184.216.34"]]})
    with pytest.raises(BadRequest, match="resolves to a private address"):
        run(check_url("https://mixed.example/v1", DEFAULT, resolver))
    run(check_url("https://ok.example/v1", DEFAULT, resolver))


def test_guarded_resolver_checks_every_lookup_against_rebinding() -> None:
    # First answer public, then the attacker's DNS flips to the metadata address.
    inner = FakeDNS({"rebind.example": [["93.184.216.34"], ["169.254.169.254"]]})
    guard = GuardedResolver(DEFAULT, inner)
    assert run(guard.resolve("rebind.example", 443)) == ["93.184.216.34"]
    with pytest.raises(BlockedAddress) as info:
        run(guard.resolve("rebind.example", 443))
    assert isinstance(info.value, OSError)
    assert "rebind.example" in info.value.message
    assert "169.254" not in info.value.message


def test_check_literal_host() -> None:
    with pytest.raises(BadRequest, match="is a loopback address"):
        check_literal_host("127.0.0.1", DEFAULT)
    with pytest.raises(BadRequest, match="is a cloud metadata address"):
        check_literal_host("::ffff:169.254.169.254", PRIVATE_OK)
    check_literal_host("127.0.0.1", PRIVATE_OK)
    check_literal_host("8.8.8.8", DEFAULT)
    check_literal_host("localhost", DEFAULT)  # names are the resolver's job


def test_system_lookup_answers_plain_address_strings() -> None:
    assert run(system_lookup("127.0.0.1", 80)) == ["127.0.0.1"]
    assert "127.0.0.1" in run(system_lookup("localhost", 0))
    with pytest.raises(OSError):
        run(system_lookup("no-such-host.invalid", 80))


def test_guarded_resolver_judges_a_unicode_host_by_its_idna_form() -> None:
    # The relay's URL parser hands over the host as written; the allow-list names the IDNA form.
    dns = FakeDNS({"xn--bcher-kva.lan": [["192.168.1.5"]]})
    guard = GuardedResolver(UpstreamPolicy(allow=("xn--bcher-kva.lan",)), dns)
    assert run(guard.resolve("bücher.lan", 80)) == ["192.168.1.5"]
    assert dns.lookups == ["xn--bcher-kva.lan"]


@asynccontextmanager
async def serve(hits: list[str]) -> AsyncIterator[int]:
    """A model server on 127.0.0.1 that answers every request "hello" and records its path."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hits.append(head.split(b" ")[1].decode())
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def guarded_request(host: str, policy: UpstreamPolicy) -> tuple[str | None, list[str]]:
    """POST through the relay's client, guarded by `policy`, to a real server on 127.0.0.1:
    (body, or None when refused, and the paths served)."""
    hits: list[str] = []
    async with serve(hits) as port:
        client = UpstreamClient(Settings(connect_timeout=2, first_byte_timeout=2), GuardedResolver(policy))
        await client.start()
        try:
            response = await client.open(Target(f"http://{host}:{port}/v1/chat/completions", ""), b"{}")
            try:
                return (await response.read()).decode(), hits
            finally:
                response.release()
        except BadRequest as exc:  # what the relay answers for a BlockedAddress
            assert exc.param == "base_url"
            assert "does not connect" in exc.message
            return None, hits
        finally:
            await client.close()


@pytest.mark.parametrize("host", ["localhost", "0x7f.1", "127.0.0.1", "[::ffff:127.0.0.1]"])
def test_real_connection_to_loopback_is_refused_by_default(host: str) -> None:
    body, hits = asyncio.run(guarded_request(host, DEFAULT))
    assert body is None
    assert hits == []


def test_real_connection_to_loopback_with_allow_private() -> None:
    body, hits = asyncio.run(guarded_request("localhost", PRIVATE_OK))
    assert body == "hello"
    assert hits == ["/v1/chat/completions"]


def test_real_connection_with_allow_listed_name() -> None:
    body, _ = asyncio.run(guarded_request("localhost", UpstreamPolicy(allow=("localhost",))))
    assert body == "hello"
    body, _ = asyncio.run(guarded_request("localhost", UpstreamPolicy(allow=("10.0.0.0/8",))))
    assert body is None
