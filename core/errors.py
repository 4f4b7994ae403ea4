"""Domain errors: one base class, translated to HTTP in exactly one place (api/errors.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client or an operator."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ServiceError):
    """A setting is missing or malformed; the message says which one and what to write."""

    code = "config"


class ValidationFailed(ServiceError):
    """A request field is invalid."""

    status = 422
    code = "validation_error"

    def __init__(self, message: str, *, field: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class Unauthorized(ServiceError):
    """The bearer key is missing or unknown."""

    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    """No such job for this tenant (another tenant's job is not found either)."""

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the job's current state."""

    status = 409
    code = "conflict"


class Unavailable(ServiceError):
    """A dependency (Redis, storage) is down or the queue is full; the client should retry."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class IllegalTransition(ServiceError):
    """A status change the state machine forbids, or one from a stale attempt."""

    code = "illegal_transition"

    def __init__(self, job_id: str, current: str | None, wanted: str) -> None:
        super().__init__(f"job {job_id}: cannot go from {current} to {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


class StorageError(ServiceError):
    """Object storage refused or failed a write after retries."""

    code = "storage_error"


class UnreadableRecord(ServiceError):
    """A stored job record that cannot be parsed; the job is quarantined (failed), not retried."""

    code = "unreadable_record"

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id}: its stored record cannot be read ({reason})")
        self.job_id = job_id
        self.reason = reason


class LimitExceeded(ServiceError):
    """A tenant's limit refuses the request for now (429); `retry_after_s` says when to retry."""

    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, *, limit: str, retry_after_s: float, policy: str, remaining: float
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.policy = policy  # the IETF RateLimit-Policy header's value
        self.remaining = remaining


class Forbidden(ServiceError):
    """The key is valid but its role may not do this."""

    status = 403
    code = "forbidden"
