"""When to send a request again: exponential backoff with jitter, and the server's `Retry-After`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dq_client.errors import APIError, ConnectionFailed, DQError


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a failing request is tried again.

    A request is retried while it keeps failing for less than `give_up_after_s` in all (long
    enough for a gateway to restart), at most `max_attempts` times if that is set. Between
    tries it waits `first_delay_s`, doubling up to `max_delay_s`, each with jitter; or, when the
    server said `Retry-After`, that long.
    """

    give_up_after_s: float = 60.0
    first_delay_s: float = 0.2
    max_delay_s: float = 10.0
    max_attempts: int | None = None

    @classmethod
    def never(cls) -> RetryPolicy:
        """One try only: every error is raised at once."""
        return cls(max_attempts=1)

    def start(self, clock: Callable[[], float] = time.monotonic) -> Retrying:
        """The retry state of one request."""
        return Retrying(self, clock)

    def backoff_s(self, failures: int, rand: float) -> float:
        """The pause after `failures` failures in a row, `rand` in [0, 1) drawing the jitter."""
        ceiling = min(self.max_delay_s, self.first_delay_s * 2.0 ** (failures - 1))
        return ceiling * (0.5 + rand / 2)  # half fixed, half random: spread, never zero


@dataclass
class Retrying:
    """The failures of one request so far, and the decision whether to try it again."""

    policy: RetryPolicy
    clock: Callable[[], float]
    rand: Callable[[], float] = random.random
    failures: int = 0
    first_failure_at: float | None = field(default=None)

    @property
    def attempts(self) -> int:
        """Tries made so far, the one in progress included."""
        return self.failures + 1

    def reset(self) -> None:
        """A success: the next failure starts a new series (a stream that delivered events)."""
        self.failures, self.first_failure_at = 0, None

    def delay_s(self, error: DQError, *, resend: bool, until: float | None = None) -> float | None:
        """Seconds to wait before trying again after `error`, or None to give up and raise it.

        `resend` says whether the request may be repeated after it reached the server (true
        for reads and for submits with an Idempotency-Key); `until` is the caller's deadline on
        the clock.
        """
        now = self.clock()
        self.failures += 1
        if self.first_failure_at is None:
            self.first_failure_at = now
        if not error.retryable or (not resend and _maybe_sent(error)):
            return None
        if self.policy.max_attempts is not None and self.failures >= self.policy.max_attempts:
            return None
        asked = error.retry_after_s if isinstance(error, APIError) else None
        pause = self.policy.backoff_s(self.failures, self.rand()) if asked is None else asked
        if now + pause - self.first_failure_at > self.policy.give_up_after_s:
            return None
        if until is not None and now + pause > until:
            return None
        return pause


def _maybe_sent(error: DQError) -> bool:
    """Whether the failed request may have been acted on by the server."""
    if isinstance(error, ConnectionFailed):
        return error.sent
    # 429 and 503 are refusals before any work; a proxy's 502/504 may hide a request that ran.
    return not (isinstance(error, APIError) and error.status in (429, 503))
