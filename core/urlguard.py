"""SSRF guard for callback URLs: which URLs we may call, and the checked addresses to call."""

import ipaddress
import re
import socket
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

from core.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

# Checked in order, first match wins, so narrow ranges come before the wide ones holding them.
# ipaddress.is_global alone misses several of these (multicast, NAT64, 6to4) and has had range
# bugs across CPython patch releases, so the list is explicit and is_global is only a backstop.
_REFUSED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("0.0.0.0/32", "an unspecified address"),
        ("0.0.0.0/8", "a 'this network' (0.0.0.0/8) address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT (100.64.0.0/10) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (this range holds cloud metadata services)"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol-assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay anycast address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "a broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        # Local-use NAT64 (RFC 8215): the operator picks where the IPv4 address sits, so it
        # cannot be unwrapped reliably; it never leaves the operator's network anyway.
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/23", "an IETF protocol-assignment address"),
        ("2001:db8::/32", "a documentation address"),
        ("fc00::/7", "a unique-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)


class UnsafeUrl(ValidationFailed):
    """A callback URL we refuse to call; `reason` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, field="webhook.url", code="unsafe_callback_url")
        self.reason = reason


class HostNotFound(UnsafeUrl):
    """The callback host did not resolve; at send time this may be a passing DNS failure."""


@dataclass(frozen=True, slots=True)
class GuardedUrl:
    """A checked callback URL and the addresses a sender must connect to (and no others)."""

    url: str
    scheme: str
    host: str
    port: int
    path_and_query: str
    addresses: tuple[str, ...]


def resolve_host(host: str, port: int) -> list[str]:
    """Return every address the system resolver gives for host (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def check_url(
    url: str, *, allow_private: bool = False, resolve: Resolver = resolve_host
) -> GuardedUrl:
    """Check a callback URL and every address its host resolves to, or raise UnsafeUrl."""
    parts = _split(url)
    host, literal = _host(parts)
    port = _port(parts)
    addresses = (str(literal),) if literal is not None else _resolve(host, port, resolve)
    if not allow_private:
        for address in addresses:
            _require_public(address)
    target = quote(parts.path or "/", safe=string.punctuation)
    query = f"?{quote(parts.query, safe=string.punctuation)}" if parts.query else ""
    return GuardedUrl(url, parts.scheme, host, port, target + query, addresses)


def _split(url: str) -> SplitResult:
    """Split the URL after the checks that need only its text."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(
            f"callback URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}"
        )
    if any(c.isspace() or not c.isprintable() for c in url):
        raise UnsafeUrl(
            "callback URL contains whitespace or control characters; percent-encode them"
        )
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnsafeUrl(f"callback URL is malformed: {e}") from e
    if parts.scheme not in _DEFAULT_PORTS:
        raise UnsafeUrl(f"callback URL scheme is {parts.scheme!r}; only http and https are allowed")
    # Userinfo is a classic parser-differential trick (http://good.example@evil/) and we never
    # send credentials in the URL.
    if "@" in parts.netloc:
        raise UnsafeUrl("callback URL must not contain a user name or password")
    return parts


def _host(parts: SplitResult) -> tuple[str, IPAddress | None]:
    """Return the host in ASCII form and, when it is an IP address, that address."""
    host = parts.hostname
    if not host:
        raise UnsafeUrl("callback URL has no host")
    try:
        return host, ipaddress.ip_address(host)
    except ValueError:
        pass
    _refuse_odd_ipv4(host)
    return _ascii_hostname(host), None


def _refuse_odd_ipv4(host: str) -> None:
    """Refuse hex, octal, integer and short IPv4 spellings (0x7f000001, 0177.0.0.1, 127.1)."""
    # inet_aton is what getaddrinfo uses for numeric hosts, so this is exactly what would connect.
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return
    address = ipaddress.IPv4Address(packed)
    raise UnsafeUrl(
        f"callback host {host} is a non-standard spelling of the IPv4 address {address};"
        " write IP addresses in dotted-decimal form"
    )


def _ascii_hostname(host: str) -> str:
    """Return the IDNA (punycode) form of a hostname, refusing characters DNS names lack."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise UnsafeUrl(f"callback host {host!r} is not a valid hostname") from e
    if len(ascii_host) > 253 or not _HOSTNAME.fullmatch(ascii_host):
        raise UnsafeUrl(f"callback host {host!r} is not a valid hostname")
    return ascii_host


def _port(parts: SplitResult) -> int:
    """Return the explicit port, or the scheme's default."""
    try:
        port = parts.port
    except ValueError as e:
        raise UnsafeUrl(f"callback URL port is invalid: {e}") from e
    if port == 0:
        raise UnsafeUrl("callback URL port must be between 1 and 65535")
    return port or _DEFAULT_PORTS[parts.scheme]


def _resolve(host: str, port: int, resolve: Resolver) -> tuple[str, ...]:
    """Resolve host once; the answer is what gets checked and what the sender connects to."""
    try:
        found = resolve(host, port)
    except OSError as e:
        raise HostNotFound(f"callback host {host} could not be resolved: {e}") from e
    if not found:
        raise HostNotFound(f"callback host {host} resolves to no address")
    return tuple(dict.fromkeys(found))


def _require_public(address: str) -> None:
    """Raise UnsafeUrl unless the address, and any IPv4 address it wraps, is public."""
    ip = ipaddress.ip_address(address)
    inner = _embedded_ipv4(ip)
    label = _refusal_label(inner or ip)
    if label is None:
        return
    shown = f"{ip} (which carries {inner})" if inner else str(ip)
    raise UnsafeUrl(
        f"callback host resolves to {shown}, {label}; only public addresses are allowed"
    )


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 transition form routes to, if it is one."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    # :: and ::1 are in ::/96 too but are their own things, not IPv4-compatible forms.
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _refusal_label(ip: IPAddress) -> str | None:
    """Say what kind of non-public address ip is, or None when it is public."""
    for network, label in _REFUSED:
        if ip in network:
            return label
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "a special-purpose (non-global) address"
    return None
