"""`dq bench`: measure the system against its baselines and write one JSON report with charts."""

from __future__ import annotations

from core.errors import ServiceError


class BenchError(ServiceError):
    """A benchmark step could not run; the message says which and why."""

    code = "bench"
