"""Where chatgate may connect: the guard against server-side request forgery via `base_url`.

Two checks, because DNS answers change between them:

- write time, `check_url`: the URL is well formed and every address its host resolves to is
  allowed (a clear 400 for the user saving the model);
- connect time, `GuardedResolver`, which the upstream pool (`upstream/client.py`) asks for every
  host, IP literals included: every address is checked again and the connection goes only to
  checked addresses (DNS rebinding defence). The relay follows no redirects and uses no
  environment proxy: both would connect somewhere no check saw. `check_literal_host` is a cheap
  extra check the registry makes once per cache fill, before any connection.

Link-local addresses and cloud metadata endpoints are refused whatever the policy; loopback,
private and shared (100.64/10) addresses only when `allow_private` is set or the host or address
is on the allow-list. IPv6 forms that embed an IPv4 address (mapped, compatible, 6to4, NAT64,
Teredo) are judged by the IPv4 address they carry.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import re
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from chatgate.config import DEFAULT_BASE_URL
from chatgate.errors import BadRequest

__all__ = [
    "BlockedAddress",
    "GuardedResolver",
    "UpstreamPolicy",
    "check_address",
    "check_literal_host",
    "check_url",
    "effective_base_url",
    "literal_ip",
    "parse_base_url",
]

IPAddress = IPv4Address | IPv6Address
_HINT = " (an administrator may allow it: CHATGATE_ALLOW_PRIVATE_UPSTREAMS, CHATGATE_UPSTREAM_ALLOWLIST)"
_RESOLVE_TIMEOUT = 5.0
# Instance metadata services: AWS/GCP/Azure (169.254.169.254), AWS over IPv6, Alibaba, Azure wireserver.
_METADATA = frozenset(ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))
_THIS_NETWORK = ip_network("0.0.0.0/8")
_SHARED = ip_network("100.64.0.0/10")
_PRIVATE = tuple(ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_V4_COMPATIBLE = ip_network("::/96")
_V4_TRANSLATED = ip_network("::ffff:0:0:0/96")
_NAT64 = ip_network("64:ff9b::/96")
_NAT64_LOCAL = ip_network("64:ff9b:1::/48")
# Hex, octal and short IPv4 forms that inet_aton (and so getaddrinfo) turn into an address.
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
_HOSTNAME = re.compile(r"[a-z0-9_.-]+")


class _Kind(enum.Enum):
    NEVER = "never"  # no policy unlocks it
    PRIVATE = "private"  # allow_private or the allow-list unlocks it
    SPECIAL = "special"  # only the allow-list unlocks it


class BlockedAddress(OSError):
    """A connect-time refusal, raised by `GuardedResolver` (an OSError, as resolvers raise);
    `message` is safe to show the user."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)
        self.message = message


@dataclass(frozen=True)
class UpstreamPolicy:
    """Which non-public upstreams are allowed: `allow` holds hostnames (`*.lan` for subdomains)
    and addresses or CIDRs, from CHATGATE_UPSTREAM_ALLOWLIST."""

    allow_private: bool = False
    allow: tuple[str, ...] = ()
    _networks: tuple[IPv4Network | IPv6Network, ...] = field(init=False, repr=False, compare=False)
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks: list[IPv4Network | IPv6Network] = []
        hosts: set[str] = set()
        for entry in (e.strip().lower() for e in self.allow):
            if not entry:
                continue
            try:
                networks.append(ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_hosts", frozenset(h for h in hosts if not h.startswith("*.")))
        object.__setattr__(self, "_suffixes", tuple(h[1:] for h in hosts if h.startswith("*.")))

    @classmethod
    def from_settings(cls, allow_private: bool, allowlist: str) -> UpstreamPolicy:
        """Build from CHATGATE_ALLOW_PRIVATE_UPSTREAMS and the comma list CHATGATE_UPSTREAM_ALLOWLIST."""
        return cls(allow_private, tuple(p.strip() for p in allowlist.split(",") if p.strip()))

    def allows_host(self, host: str) -> bool:
        """True when the hostname is on the allow-list."""
        name = host.lower().rstrip(".")
        return name in self._hosts or any(name.endswith(suffix) for suffix in self._suffixes)

    def allows_ip(self, ip: IPAddress) -> bool:
        """True when the address (or the IPv4 address it embeds) falls in an allow-listed CIDR."""
        inner = _embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
        return any(
            (ip.version == net.version and ip in net) or (inner is not None and inner in net) for net in self._networks
        )


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (and reaches) through a translation scheme."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64_LOCAL:  # RFC 6052 /48: octets 6-7 and 9-10, octet 8 is reserved
        return IPv4Address(ip.packed[6:8] + ip.packed[9:11])
    if ip in _NAT64 or ip in _V4_TRANSLATED or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _classify(ip: IPAddress) -> tuple[str, _Kind] | None:
    """Why an address is not a plain public one, or None when it is."""
    if isinstance(ip, IPv6Address):
        if ip.scope_id:
            ip = IPv6Address(int(ip))  # "fe80::1%eth0": judge the address, not the interface
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return _classify(inner)
    if ip in _METADATA:
        return "cloud metadata", _Kind.NEVER
    if ip.is_link_local:
        return "link-local", _Kind.NEVER
    if ip.is_multicast:
        return "multicast", _Kind.NEVER
    if ip.is_unspecified or (isinstance(ip, IPv4Address) and ip in _THIS_NETWORK):
        return "unspecified", _Kind.NEVER
    if ip.is_loopback:
        return "loopback", _Kind.PRIVATE
    if isinstance(ip, IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)", _Kind.PRIVATE
    if ip.is_reserved:
        return "reserved", _Kind.SPECIAL
    if any(ip.version == net.version and ip in net for net in _PRIVATE) or (
        isinstance(ip, IPv6Address) and ip.is_site_local
    ):
        return "private", _Kind.PRIVATE
    if not ip.is_global:
        return "special-purpose", _Kind.SPECIAL
    return None


def check_address(ip: IPAddress, host: str, policy: UpstreamPolicy) -> None:
    """Raise BadRequest (param base_url) unless chatgate may connect to `ip`, reached as `host`."""
    found = _classify(ip)
    if found is None:
        return
    reason, kind = found
    if kind is not _Kind.NEVER:
        if policy.allows_host(host) or policy.allows_ip(ip):
            return
        if kind is _Kind.PRIVATE and policy.allow_private:
            return
    # The resolved address is not named: that would turn this error into an internal DNS oracle.
    verb = "is" if literal_ip(host) is not None else "resolves to"
    article = "an" if reason[0] in "aeiou" else "a"
    hint = "" if kind is _Kind.NEVER else _HINT
    raise BadRequest(
        f"base_url host {host} {verb} {article} {reason} address, which chatgate does not connect to{hint}",
        param="base_url",
    )


def literal_ip(host: str) -> IPAddress | None:
    """The address `host` denotes if it is an IP literal in any form the C library accepts
    (`127.0.0.1`, `[::1]`, `2130706433`, `0177.0.0.1`, `0x7f.1`, `0`), else None."""
    bare = host.strip("[]")
    try:
        return ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(bare):
        try:
            return IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def effective_base_url(url: str) -> str:
    """The base URL to use: an empty one means OpenAI's, as in chatbot-ui."""
    return url.strip() or DEFAULT_BASE_URL


def parse_base_url(url: str) -> URL:
    """Parse a base URL: http(s), a host, no credentials; BadRequest naming base_url otherwise."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise BadRequest("base_url is not a valid URL", param="base_url") from None
    if parsed.scheme not in ("http", "https"):
        raise BadRequest("base_url must start with http:// or https://", param="base_url")
    host = parsed.raw_host  # the ASCII (IDNA) form, which is what gets resolved
    if not host:
        raise BadRequest("base_url has no host", param="base_url")
    if parsed.raw_user or parsed.raw_password:
        raise BadRequest("base_url must not contain credentials; put the key in api_key", param="base_url")
    if ":" in host:
        try:
            if "%" in host:  # zone ids ("%eth0") only ever name link-local addresses
                raise ValueError(host)
            IPv6Address(host)
        except ValueError:
            raise BadRequest("base_url has an invalid host", param="base_url") from None
    elif not _HOSTNAME.fullmatch(host):
        raise BadRequest("base_url has an invalid host", param="base_url")
    return parsed


def check_literal_host(host: str, policy: UpstreamPolicy) -> None:
    """Check an IP-literal host without any lookup: call it with `URL(base_url).raw_host`.
    Rows that never passed `check_url` (written by chatbot-ui, or before a policy change) are
    refused this way before any connection is tried.

    Does nothing for hostnames (`GuardedResolver` checks those); raises BadRequest (base_url).
    """
    ip = literal_ip(host)
    if ip is not None:
        check_address(ip, host, policy)


async def check_url(url: str, policy: UpstreamPolicy, resolver: AbstractResolver | None = None) -> None:
    """Write-time check of a base URL: well formed, and every address its host resolves to allowed."""
    if not url.strip():
        return  # the default, OpenAI's public API
    parsed = parse_base_url(url)
    host = parsed.raw_host or ""
    ip = literal_ip(host)
    if ip is not None:
        check_address(ip, host, policy)
        if isinstance(ip, IPv4Address) and host != str(ip):
            # Other software reads these forms differently (or refuses them): ask for the plain one.
            raise BadRequest(f"base_url host {host} must be written as {ip}", param="base_url")
        return
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT):
            if resolver is None:
                infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or 0, type=socket.SOCK_STREAM)
                addresses = [str(info[4][0]) for info in infos]
            else:
                results = await resolver.resolve(host, parsed.port or 0, family=socket.AF_UNSPEC)
                addresses = [result["host"] for result in results]
    except (OSError, UnicodeError, TimeoutError):
        addresses = []
    if not addresses:
        raise BadRequest(f"base_url host {host} cannot be resolved", param="base_url")
    for address in addresses:
        check_address(ip_address(address), host, policy)


class GuardedResolver(AbstractResolver):
    """A resolver (aiohttp's interface) that refuses a host when any address it resolves to is
    not allowed.

    Every address returned was checked, and the pool connects to exactly those, so a DNS answer
    that changes after the check cannot redirect the connection. Raises `BlockedAddress`.
    """

    def __init__(self, policy: UpstreamPolicy, resolver: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` with the inner resolver and check every address."""
        if self._inner is None:
            # Created here, not in __init__, because ThreadedResolver binds the running loop.
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            try:
                check_address(ip_address(result["host"]), host, self._policy)
            except BadRequest as exc:
                raise BlockedAddress(exc.message) from None
            except ValueError:
                raise BlockedAddress(f"base_url host {host} resolved to something not an address") from None
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()
