"""What the gateway holds for its lifetime, made once in the lifespan."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass, field

from redis.asyncio import Redis

from api.watch import Watcher
from core.settings import Settings
from core.storage import FileStore, S3Store, open_store
from core.store import AsyncJobStore, Ledger

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """Keys are kept only as SHA-256 digests."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Resources:
    """The gateway's connections and lookups."""

    settings: Settings
    redis: Redis
    jobs: AsyncJobStore
    storage: S3Store | FileStore
    tenants: dict[str, str]  # sha256(key) -> tenant
    watcher: Watcher  # job changes pushed to waiting requests
    cache: dict[str, tuple[float, object]] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        """No keys configured: every caller is the `public` tenant."""
        return not self.tenants


def url_secret(settings: Settings) -> bytes:
    """The key that signs local file URLs; a random one lives only as long as this process."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    log.warning("DQ_SECRET_KEY is not set: image URLs signed now stop working after a restart")
    return secrets.token_bytes(32)


def build(settings: Settings) -> Resources:
    """Connect everything the gateway needs."""
    redis = Redis.from_url(
        settings.require_redis(),
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        max_connections=512,
    )
    tenants = {hash_key(k): t for k, t in settings.tenants().items()}
    if not tenants:
        log.warning("DQ_API_KEYS is empty: the API is OPEN, anyone who reaches it can submit jobs")
    storage = open_store(
        settings.storage,
        secret=url_secret(settings),
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    jobs = AsyncJobStore(redis, Ledger.of(settings))
    return Resources(settings, redis, jobs, storage, tenants, Watcher(settings.require_redis()))
