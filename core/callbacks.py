"""Webhook delivery: one pinned HTTP attempt, and when (whether) to try again."""

import contextlib
import random
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpcore

from core.urlguard import GuardedUrl

# Delays after attempts 1, 2, ...: the Standard Webhooks example schedule, 10 attempts over
# about 75 hours. Each delay is jittered so receivers coming back up are not hit all at once.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
JITTER = 0.2
# A receiver may ask for a longer pause with Retry-After, but not to park a delivery forever.
MAX_RETRY_AFTER_S = 86400.0
# Records of attempts are shown on the job; a transport error's text is kept short.
_MAX_ERROR_CHARS = 200
_GONE = 410
_DEFAULT_HEADERS = {"content-type": "application/json", "user-agent": "diffusion-queue-webhooks"}

_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt: a status code, or an error when none came back."""

    status_code: int | None
    error: str | None
    retry_after_s: float | None
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Whether the receiver answered 2xx, the only answer that counts as delivered."""
        return self.status_code is not None and 200 <= self.status_code < 300


def deliver(
    target: GuardedUrl,
    body: bytes,
    headers: Mapping[str, str],
    *,
    connect_timeout: float = 5.0,
    total_timeout: float = 15.0,
    max_response_bytes: int = 4096,
    ssl_context: ssl.SSLContext | None = None,
) -> Attempt:
    """POST body once to the target's checked addresses; transport failures come back as errors."""
    started = time.monotonic()
    backend = _PinnedBackend(target.addresses, deadline=started + total_timeout)
    timeouts = {"connect": connect_timeout, "read": total_timeout, "write": total_timeout}
    with httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend) as pool:
        try:
            status, retry_after = _post(pool, target, body, headers, timeouts, max_response_bytes)
        except _TRANSPORT_ERRORS as e:
            return Attempt(None, _describe(e), None, time.monotonic() - started)
    return Attempt(status, None, retry_after, time.monotonic() - started)


def is_retryable(attempt: Attempt) -> bool:
    """Whether to try again: every failure (non-2xx, timeout, connection error) except 410 Gone."""
    # DESIGN retries every non-2xx, 3xx and 4xx included: a receiver's misconfiguration is often
    # fixed within the ~3 days the schedule spans. 410 is the receiver saying "stop".
    return not attempt.ok and attempt.status_code != _GONE


def next_delay(
    attempt_no: int,
    schedule: Sequence[float],
    retry_after_s: float | None,
    rng: random.Random,
) -> float | None:
    """Seconds to wait after failed attempt number attempt_no (from 1), or None to give up."""
    if attempt_no < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt_no}")
    if attempt_no > len(schedule):
        return None
    delay = schedule[attempt_no - 1] * rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return delay


def parse_retry_after(value: str, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After value (delta-seconds or HTTP-date), or None if unreadable."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _post(
    pool: httpcore.ConnectionPool,
    target: GuardedUrl,
    body: bytes,
    headers: Mapping[str, str],
    timeouts: dict[str, float],
    max_response_bytes: int,
) -> tuple[int, float | None]:
    """Send the request and return the status and Retry-After, reading a capped body."""
    url = httpcore.URL(
        scheme=target.scheme, host=target.host, port=target.port, target=target.path_and_query
    )
    with pool.stream(
        "POST",
        url,
        headers=_headers(target, headers),
        content=body,
        extensions={"timeout": timeouts},
    ) as response:
        _drain(response.iter_stream(), max_response_bytes)
        return response.status, _retry_after(response.headers)


def _drain(chunks: Iterable[bytes], limit: int) -> None:
    """Read up to about limit bytes of the response body and drop them."""
    # The status line already decided the attempt; a body that stalls or breaks must not turn a
    # delivered 2xx into a failure that gets retried.
    with contextlib.suppress(*_TRANSPORT_ERRORS):
        received = 0
        for chunk in chunks:
            received += len(chunk)
            if received >= limit:
                return


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Return the response's Retry-After in seconds, if it has a readable one."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            return parse_retry_after(value.decode("latin-1"))
    return None


def _headers(target: GuardedUrl, given: Mapping[str, str]) -> list[tuple[str, str]]:
    """Return the request headers: the caller's, over defaults, under the original Host."""
    lowered = {name.lower(): value for name, value in given.items()}
    # The Host is always the checked URL's, so a caller cannot aim the request elsewhere.
    lowered.pop("host", None)
    return list({**_DEFAULT_HEADERS, **lowered, "host": _authority(target)}.items())


def _authority(target: GuardedUrl) -> str:
    """Return the Host header for the original URL: host, bracketed if IPv6, and any odd port."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def _describe(error: Exception) -> str:
    """Return a short public description of a transport failure."""
    if isinstance(error, httpcore.TimeoutException):
        return "timeout"
    if isinstance(error, httpcore.ConnectError):
        kind = "connection failed"
    elif isinstance(error, httpcore.NetworkError):
        kind = "connection broken"
    else:
        kind = "protocol error"
    return f"{kind}: {error}"[:_MAX_ERROR_CHARS]


class _PinnedBackend(httpcore.NetworkBackend):
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
                limit = _remaining(self._deadline, timeout, httpcore.ConnectTimeout)
                stream = self._sockets.connect_tcp(
                    address, port, limit, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                failure = e
                continue
            return _DeadlineStream(stream, self._deadline)
        raise failure


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation also stops at one overall deadline."""

    # httpcore's timeouts apply per read, so a receiver that trickles a byte at a time could hold
    # a worker forever; the deadline bounds the whole exchange.

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read, giving up at the deadline."""
        limit = _remaining(self._deadline, timeout, httpcore.ReadTimeout)
        return self._inner.read(max_bytes, limit)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write, giving up at the deadline."""
        self._inner.write(buffer, _remaining(self._deadline, timeout, httpcore.WriteTimeout))

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
        limit = _remaining(self._deadline, timeout, httpcore.ConnectTimeout)
        inner = self._inner.start_tls(ssl_context, server_hostname, limit)
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> object:
        """Pass through socket details (peer address, TLS object) to httpcore."""
        return self._inner.get_extra_info(info)


def _remaining(deadline: float, timeout: float | None, expired: type[Exception]) -> float:
    """Return the smaller of timeout and the time left, raising expired if none is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the delivery ran out of time")
    return left if timeout is None else min(timeout, left)
