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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

from chatgate.config import DEFAULT_BASE_URL
from chatgate.errors import BadRequest

__all__ = [
    "BaseURL",
    "BlockedAddress",
    "GuardedResolver",
    "UpstreamPolicy",
    "check_address",
    "check_literal_host",
    "check_url",
    "effective_base_url",
    "literal_ip",
    "parse_base_url",
    "system_lookup",
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
# Characters urlsplit drops or keeps where other readers of the URL split it differently.
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


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


@dataclass(frozen=True)
class BaseURL:
    """A checked base URL: `host` is the ASCII (IDNA) form that gets resolved, without brackets."""

    scheme: str
    host: str
    port: int


def parse_base_url(url: str) -> BaseURL:
    """Parse a base URL: http(s), a host, no credentials; BadRequest naming base_url otherwise.

    `urllib.parse.urlsplit` is the parser, as in the relay (`upstream/http11.py`), but it is
    lenient where other software reads a URL differently: it drops tabs and newlines, ignores
    text after `]`, takes the last `@` as the end of the credentials, and keeps backslashes (a
    browser's `/`). Such URLs are refused here, so the host checked is the host connected to
    whoever reads the stored URL.
    """
    url = url.strip()
    if _UNSAFE_CHARS.search(url):
        raise BadRequest("base_url must not contain spaces, control characters or backslashes", param="base_url")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BadRequest("base_url is not a valid URL", param="base_url") from None
    if parts.scheme not in ("http", "https") or not url.lower().startswith(parts.scheme + "://"):
        raise BadRequest("base_url must start with http:// or https://", param="base_url")
    if "@" in parts.netloc:
        raise BadRequest("base_url must not contain credentials; put the key in api_key", param="base_url")
    if "?" in url or "#" in url:  # even empty ones
        # The relay appends /chat/completions to the base URL, which would land in either.
        raise BadRequest("base_url must not have a query or a fragment", param="base_url")
    if not parts.path.isascii():
        raise BadRequest("base_url path must be ASCII (percent-encode it)", param="base_url")
    written, port = _split_netloc(parts.netloc)
    if not written:
        raise BadRequest("base_url has no host", param="base_url")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return BaseURL(parts.scheme, _ascii_host(written), port)


def _split_netloc(netloc: str) -> tuple[str, int | None]:
    """The host as written (lowercase, no brackets) and the port, if the netloc is exactly
    `host`, `host:port`, `[v6]` or `[v6]:port`."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise BadRequest("base_url has an invalid host", param="base_url")
        host, rest = netloc[1:end].lower(), netloc[end + 1 :]
        if "%" in host:  # zone ids ("%25eth0") only ever name link-local addresses
            raise BadRequest("base_url has an invalid host", param="base_url")
        try:
            IPv6Address(host)
        except ValueError:
            raise BadRequest("base_url has an invalid host", param="base_url") from None
    else:
        host, colon, port_text = netloc.partition(":")
        host, rest = host.lower(), colon + port_text
    if not rest:
        return host, None
    digits = rest[1:]
    if rest[0] != ":" or not (digits.isascii() and digits.isdigit() and 0 < int(digits) < 65536):
        raise BadRequest("base_url has an invalid port", param="base_url")
    return host, int(digits)


def _ascii_host(host: str) -> str:
    """The ASCII form of a written host, as the C library is asked for it (Python's and uvloop's
    getaddrinfo encode with the stdlib IDNA codec); BadRequest when it is not a hostname."""
    if ":" in host:
        return host  # an IPv6 literal, checked by _split_netloc
    try:
        # Also for an ASCII host: the codec refuses an empty or over-long label (".b.example"),
        # which the relay could not put in a Host header either.
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise BadRequest("base_url has an invalid host", param="base_url") from None
    if not _HOSTNAME.fullmatch(ascii_host) or (ascii_host != host and literal_ip(ascii_host) is not None):
        # The second: "127。0。0。1" (ideographic full stops) is 127.0.0.1 to the IDNA codec.
        raise BadRequest("base_url has an invalid host", param="base_url")
    return ascii_host


def check_literal_host(host: str, policy: UpstreamPolicy) -> None:
    """Check an IP-literal host without any lookup: call it with `parse_base_url(base_url).host`.
    Rows that never passed `check_url` (written by chatbot-ui, or before a policy change) are
    refused this way before any connection is tried.

    Does nothing for hostnames (`GuardedResolver` checks those); raises BadRequest (base_url).
    """
    ip = literal_ip(host)
    if ip is not None:
        check_address(ip, host, policy)


Lookup = Callable[[str, int], Awaitable[list[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    """The addresses the C library resolves `host` to (through the loop's getaddrinfo: uvloop's
    or a thread), each once, in the order given; raises OSError (`socket.gaierror`)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_url(url: str, policy: UpstreamPolicy, lookup: Lookup = system_lookup) -> None:
    """Write-time check of a base URL: well formed, and every address its host resolves to allowed."""
    if not url.strip():
        return  # the default, OpenAI's public API
    host = parse_base_url(url).host
    ip = literal_ip(host)
    if ip is not None:
        check_address(ip, host, policy)
        if isinstance(ip, IPv4Address) and host != str(ip):
            # Other software reads these forms differently (or refuses them): ask for the plain one.
            raise BadRequest(f"base_url host {host} must be written as {ip}", param="base_url")
        return
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT):
            addresses = await lookup(host, 0)
    except (OSError, UnicodeError, TimeoutError):
        addresses = []
    if not addresses:
        raise BadRequest(f"base_url host {host} cannot be resolved", param="base_url")
    for address in addresses:
        check_address(ip_address(address), host, policy)


class GuardedResolver:
    """Resolves a host for the upstream pool and refuses it when any address it resolves to is
    not allowed.

    Every address returned was checked, and the pool connects to exactly those, so a DNS answer
    that changes after the check cannot redirect the connection. Raises `BlockedAddress`, or
    the lookup's OSError.
    """

    def __init__(self, policy: UpstreamPolicy, lookup: Lookup = system_lookup) -> None:
        self._policy = policy
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0) -> list[str]:
        """The addresses of `host` (IP literals included), every one checked."""
        if not host.isascii():
            try:  # the form write time checked, so that the allow-list matches the same name
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise BlockedAddress(f"base_url host {host} is not a valid hostname") from None
        addresses = await self._lookup(host, port)
        for address in addresses:
            try:
                check_address(ip_address(address), host, self._policy)
            except BadRequest as exc:
                raise BlockedAddress(exc.message) from None
            except ValueError:
                raise BlockedAddress(f"base_url host {host} resolved to something not an address") from None
        return addresses

    async def close(self) -> None:
        """Nothing to release (the lookup holds no resources); kept for the client's lifecycle."""
