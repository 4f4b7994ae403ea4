"""Rate limits kept in Redis (GCRA), for what is limited across gateway processes besides
submits (whose limits run inside the submit script): webhook redeliveries per job and per tenant."""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from core import keys, scripts


class Limiter:
    """`await limiter.wait_s(name, rate, burst)`: 0 if allowed now (and counted), else seconds."""

    def __init__(self, redis: Redis) -> None:
        self._limit = redis.register_script(scripts.plain("limit"))

    async def wait_s(self, name: str, rate: float, burst: int) -> float:
        """Count one event against `name`'s limit, unless it must wait; how long it must."""
        table = {
            "key": f"{keys.PREFIX}:limit:{name}",
            "rate": rate,
            "burst": burst,
            "now": time.time(),
        }
        allowed, wait = await self._limit([], [json.dumps(table)])
        return 0.0 if int(allowed) else float(wait)
