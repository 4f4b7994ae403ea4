"""Reads (GET: job reads, long polls, event streams, lists) have their own limit per tenant, so
that polling cannot crowd out submits.

Counted in each gateway process (GCRA, no Redis round trip on the read path): with `--workers N`
a tenant may read up to N times its rate in all. Never keyed by address: by the tenant of the key.
"""

from __future__ import annotations

import time

from api.deps import Caller
from core.errors import LimitExceeded

MAX_TENANTS = 10_000  # the table is cleared past this (a burst of unknown tenants cannot grow it)


class ReadLimiter:
    """A GCRA per tenant: `read_burst` reads at once, then `read_rate` per second."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}  # tenant -> theoretical arrival time

    async def refusal(self, caller: Caller) -> LimitExceeded | None:
        """None if the read may go on, else the 429 that refuses it."""
        limits = await caller.res.keys.limits(caller.tenant)
        if not limits.read_rate:
            return None
        now, interval = time.monotonic(), 1.0 / limits.read_rate
        tolerance = (limits.read_burst - 1) * interval
        tat = max(self.tat.get(caller.tenant, now), now)
        if tat - now > tolerance:
            retry = tat - tolerance - now
            return LimitExceeded(
                f"over {limits.read_rate:g} reads/s; retry in {retry:.2f} s (long-poll with"
                " ?wait= or stream /events instead of polling)",
                limit="reads",
                retry_after_s=retry,
                policy=f'"reads";q={limits.read_burst};w={max(1, round(tolerance + interval))}',
                remaining=0,
            )
        if len(self.tat) > MAX_TENANTS:
            self.tat.clear()
        self.tat[caller.tenant] = tat + interval
        return None
