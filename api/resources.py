"""What the gateway holds for its lifetime, made once in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from api.keys import Keys
from api.watch import Watcher
from core import connections, heartbeats
from core.catalog import Catalog
from core.limiter import Limiter
from core.settings import Settings
from core.storage import FileStore, S3Store, open_store
from core.store import AsyncJobStore, Ledger
from core.tenants import AsyncKeyStore, TenantLimits, static_identities
from core.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pool:
    """One model's live workers, as their heartbeats say."""

    serving: int = 0  # model loaded, taking work
    starting: int = 0  # loading the model
    images_per_s: float | None = None
    units_per_s: float | None = None


def pools_of(beats: list[heartbeats.WorkerBeat]) -> dict[str, Pool]:
    """Each model's pool."""
    by_model: dict[str, list[heartbeats.WorkerBeat]] = {}
    for beat in beats:
        by_model.setdefault(beat.model, []).append(beat)
    return {
        model: Pool(
            serving=sum(1 for b in group if b.state in ("idle", "busy")),
            starting=sum(1 for b in group if b.state == "starting"),
            images_per_s=heartbeats.images_per_s(group),
            units_per_s=heartbeats.units_per_s(group),
        )
        for model, group in by_model.items()
    }


class Throughput:
    """Images/s of all live workers (and each model's pool), read from Redis at most once a second.

    Every request for a queued job wants it (for the ETA); when the cached value expires, the
    first of them reads it again and the others wait for that one read instead of each making
    their own (a burst would otherwise open a Redis connection per waiting request).
    """

    def __init__(self, redis: Redis, live_within_s: float, max_age_s: float = 1.0) -> None:
        self.redis, self.live_within_s, self.max_age_s = redis, live_within_s, max_age_s
        self._value: float | None = None
        self._pools: dict[str, Pool] = {}
        self._at = float("-inf")
        self._reading: asyncio.Future[float | None] | None = None

    async def get(self) -> float | None:
        """The sum of the live workers' measured images/s; None while none has measured any."""
        if time.monotonic() - self._at <= self.max_age_s:
            return self._value
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        # Shielded: a request that goes away must not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    async def pool(self, model: str) -> Pool:
        """One model's live workers and their measured throughput."""
        await self.get()
        return self._pools.get(model, Pool())

    async def _read(self) -> float | None:
        try:
            beats = await heartbeats.live_async(self.redis, self.live_within_s)
            self._value = heartbeats.images_per_s(beats)
            self._pools = pools_of(beats)
            self._at = time.monotonic()
            return self._value
        finally:
            self._reading = None


@dataclass
class Resources:
    """The gateway's connections and lookups."""

    settings: Settings
    redis: Redis
    jobs: AsyncJobStore
    storage: S3Store | FileStore
    keys: Keys  # who a bearer key belongs to, and each tenant's limits
    watcher: Watcher  # job changes pushed to waiting requests
    throughput: Throughput  # the workers' images/s and units/s, for queue ETAs
    catalog: Catalog  # the models served, their limits and defaults, and the LoRAs
    limiter: Limiter  # rate limits kept in Redis (webhook redeliveries)
    tracing: Tracing = field(default_factory=Tracing)  # off unless OTEL_* asks for it


def build(settings: Settings, tracing: Tracing | None = None) -> Resources:
    """Connect everything the gateway needs."""
    redis = connections.async_client(settings, max_connections=512)
    static = static_identities(settings)
    storage = open_store(
        settings.storage,
        secret=settings.url_secret() or b"",  # unset only with S3 storage (api.app.check)
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    jobs = AsyncJobStore(redis, Ledger.of(settings))
    throughput = Throughput(redis, settings.heartbeat_s * 3)
    watcher = Watcher(connections.subscriber_client(settings))
    defaults = TenantLimits.of(settings)
    keys_ = Keys(static, AsyncKeyStore(redis), defaults, lambda: watcher.subscribed)
    watcher.on_keys = keys_.changed
    catalog = Catalog.from_settings(settings)
    limiter = Limiter(redis)
    return Resources(
        settings,
        redis,
        jobs,
        storage,
        keys_,
        watcher,
        throughput,
        catalog,
        limiter,
        tracing or Tracing(),
    )
