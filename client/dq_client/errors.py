"""What can go wrong, as exceptions with one base class, `DQError`.

An answer of the server with an error status becomes an `APIError` subclass chosen by the status,
carrying the server's `code`, `message` and `field`; a connection that fails becomes
`ConnectionFailed`; a job that ends badly, `JobFailed`.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dq_client.models import Job


class DQError(Exception):
    """Base of every error this SDK raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether the same request is worth sending again, later."""
        return False


class ConnectionFailed(DQError):
    """The server could not be reached, or the connection broke before an answer came."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent  # the request may have reached the server (False: surely not)

    @property
    def retryable(self) -> bool:
        """Always: the server may be back in a moment (a restart, a network blip)."""
        return True


class APIError(DQError):
    """The server answered with an error: its `status`, `code`, `message` and `field`."""

    status: int = 0

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.headers = dict(headers or {})
        self.body = body or {}
        self.attempts = 1  # requests sent before this answer (more than 1 after retries)

    @property
    def retryable(self) -> bool:
        """429, 503, and a proxy's 502/504: the same request may succeed later."""
        return self.status in RETRY_STATUSES

    def __str__(self) -> str:
        where = f", field {self.field}" if self.field else ""
        return f"{self.message} ({self.status} {self.code}{where})"

    @property
    def retry_after_s(self) -> float | None:
        """Seconds the server asked us to wait before trying again, if it said."""
        return retry_after(self.headers)


class BadRequest(APIError):
    """400: the request is malformed."""


class Unauthorized(APIError):
    """401: the API key is missing or unknown."""


class Forbidden(APIError):
    """403: the key may not do this."""


class NotFound(APIError):
    """404: no such job for this key (another tenant's job is not found either)."""


class Conflict(APIError):
    """409: the job's state forbids this (cancel a job that already ended)."""


class PayloadTooLarge(APIError):
    """413: the request body is over the server's limit."""


class ValidationError(APIError):
    """422: a field is invalid; `field` names it."""


class RateLimited(APIError):
    """429: too many requests or jobs for this key; retried after `Retry-After` by the SDK."""

    @property
    def limit(self) -> Any:
        """The limit that was hit, as the server described it in the error body."""
        return self.body.get("error", {}).get("limit")

    @property
    def policy(self) -> str | None:
        """The `RateLimit-Policy` header, if the server sent one."""
        return _header(self.headers, "ratelimit-policy")


class ServerError(APIError):
    """5xx: the server failed; a proxy's 502 and 504 are retried, a 500 is not (it would recur)."""


class Unavailable(ServerError):
    """503: the server or its store is down, or the queue is full; retried after `Retry-After`."""


class JobFailed(DQError):
    """The job ended without images: failed (its `error` says why) or canceled."""

    def __init__(self, job: Job) -> None:
        reason = f": {job.error.message} ({job.error.code})" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


class JobNotFinished(DQError):
    """The job has not ended yet, so it has no images to fetch."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} is still {job.status}; wait for it first")
        self.job = job


class WaitTimeout(DQError, TimeoutError):
    """The job did not end within the time given; `job` is how it was last seen."""

    def __init__(self, job: Job, timeout_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout_s:g} s")
        self.job = job


class WebhookVerificationError(DQError):
    """A webhook delivery whose signature, timestamp or headers do not check out."""


RETRY_STATUSES = frozenset({429, 502, 503, 504})

_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> APIError:
    """The exception for an error answer; a body that is not the API's envelope is kept as text."""
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(content)
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    error = body.get("error") if isinstance(body.get("error"), dict) else None
    if error is None:
        text = content.decode("utf-8", "replace").strip()[:200]
        code, message, field = f"http_{status}", text or f"HTTP {status}", None
    else:
        code = str(error.get("code", f"http_{status}"))
        message = str(error.get("message", ""))
        field = error.get("field")
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return kind(message, status=status, code=code, field=field, headers=headers, body=body)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


_RESET = re.compile(r"(?:^|[;,\s])t=(\d+)")


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date), else `RateLimit`'s `t=`."""
    value = _header(headers, "retry-after")
    if value is not None:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - (time.time() if now is None else now))
    limit = _header(headers, "ratelimit")
    match = _RESET.search(limit) if limit else None
    return float(match.group(1)) if match else None
