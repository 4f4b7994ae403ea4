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

from core.outbound import TRANSPORT_ERRORS, pinned_request
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
    try:
        with pinned_request(
            target,
            "POST",
            {**_DEFAULT_HEADERS, **{name.lower(): value for name, value in headers.items()}},
            body,
            connect_timeout=connect_timeout,
            total_timeout=total_timeout,
            ssl_context=ssl_context,
        ) as response:
            _drain(response.iter_stream(), max_response_bytes)
            status, retry_after = response.status, _retry_after(response.headers)
    except TRANSPORT_ERRORS as e:
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


def _drain(chunks: Iterable[bytes], limit: int) -> None:
    """Read up to about limit bytes of the response body and drop them."""
    # The status line already decided the attempt; a body that stalls or breaks must not turn a
    # delivered 2xx into a failure that gets retried.
    with contextlib.suppress(*TRANSPORT_ERRORS):
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
