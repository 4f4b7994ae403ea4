"""Outbound HTTP to a checked URL: one request, pinned to the checked addresses, with a deadline.

Webhook deliveries (core/callbacks.py) and image inputs (worker/inputs.py) both call URLs that a
client gave us. Both go through here, so neither can connect anywhere the SSRF guard did not check,
and neither can be held past its deadline by a peer that trickles bytes.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import httpcore

from core.urlguard import GuardedUrl

# What a failed exchange raises: the caller decides what each means to it.
TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)


@contextmanager
def pinned_request(
    target: GuardedUrl,
    method: str,
    headers: Mapping[str, str],
    body: bytes = b"",
    *,
    connect_timeout: float,
    total_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[httpcore.Response]:
    """Send one request to the target's checked addresses; yields the response, body unread."""
    backend = PinnedBackend(target.addresses, deadline=time.monotonic() + total_timeout)
    timeouts = {"connect": connect_timeout, "read": total_timeout, "write": total_timeout}
    url = httpcore.URL(
        scheme=target.scheme, host=target.host, port=target.port, target=target.path_and_query
    )
    # No redirect is ever followed: httpcore has no such feature, and each caller treats a 3xx
    # as an answer, so a redirect cannot lead a request into private address space.
    with (
        httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend) as pool,
        pool.stream(
            method,
            url,
            headers=request_headers(target, headers),
            content=body,
            extensions={"timeout": timeouts},
        ) as response,
    ):
        yield response


def request_headers(target: GuardedUrl, given: Mapping[str, str]) -> list[tuple[str, str]]:
    """The caller's headers, with the Host always the checked URL's."""
    lowered = {name.lower(): value for name, value in given.items()}
    # The Host is always the checked URL's, so a caller cannot aim the request elsewhere.
    lowered.pop("host", None)
    return [*lowered.items(), ("host", _authority(target))]


def _authority(target: GuardedUrl) -> str:
    """The Host header for the original URL: host, bracketed if IPv6, and any odd port."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to the guard's checked addresses, never to what the host name resolves to now."""

    def __init__(self, addresses: Sequence[str], *, deadline: float) -> None:
        self._addresses = addresses
        self._deadline = deadline
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Connect to the first checked address that answers, trying them in order."""
        # host is ignored on purpose: resolving it again is the DNS-rebinding hole.
        failure: Exception = httpcore.ConnectError("no checked address to connect to")
        for address in self._addresses:
            try:
                limit = remaining(self._deadline, timeout, httpcore.ConnectTimeout)
                stream = self._sockets.connect_tcp(
                    address, port, limit, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                failure = e
                continue
            return DeadlineStream(stream, self._deadline)
        raise failure


class DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation also stops at one overall deadline."""

    # httpcore's timeouts apply per read, so a peer that trickles a byte at a time could hold
    # a worker forever; the deadline bounds the whole exchange.

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read, giving up at the deadline."""
        limit = remaining(self._deadline, timeout, httpcore.ReadTimeout)
        return self._inner.read(max_bytes, limit)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write, giving up at the deadline."""
        self._inner.write(buffer, remaining(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        """Close the socket."""
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """Handshake with SNI and certificate checks for the original host name."""
        limit = remaining(self._deadline, timeout, httpcore.ConnectTimeout)
        inner = self._inner.start_tls(ssl_context, server_hostname, limit)
        return DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> object:
        """Pass through socket details (peer address, TLS object) to httpcore."""
        return self._inner.get_extra_info(info)


def remaining(deadline: float, timeout: float | None, expired: type[Exception]) -> float:
    """The smaller of timeout and the time left, raising expired if none is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request ran out of time")
    return left if timeout is None else min(timeout, left)
