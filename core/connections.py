"""Every Redis connection the service makes, in one place: one server, or Redis behind Sentinel.

Each process asks here for the client it needs: a sync client (worker, webhook sender, scaler,
health probe), an async one (the gateway), an async one that may wait in reads for as long as it
likes (the gateway's pub/sub subscription), and the Celery broker. Timeouts, retries and health
checks are then the same everywhere.

With `DQ_REDIS_SENTINELS` set, every client finds the master through the sentinels and finds it
again after a failover: redis-py's Sentinel pools ask for the master's address whenever they open
a connection, and turn a READONLY reply (the old master, now a replica) into a connection error,
which the retry below sends again to the new master. Celery uses kombu's `sentinel://` transport
with the same master name. The master's password, user and database still come from
`DQ_REDIS_URL`, whose host and port are then not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from core.errors import ConfigError
from core.settings import Settings

CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_S = 30  # ping a connection that sat idle this long before using it again
# Connection errors only (refused, reset, the master gone or demoted): a command that timed out
# may have run, and sending a ledger write twice is not always harmless. redis-py's own default
# retries both, ten times: a dead server held a caller for ten timeouts.
RETRIES = 3
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.1, 1.0  # the first wait between tries, and the longest


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to log in: a URL, or sentinels and the name of their master."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "mymaster"
    sentinel_password: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> RedisTarget:
        """The target the settings name (DQ_REDIS_URL, DQ_REDIS_SENTINELS, DQ_REDIS_MASTER)."""
        secret = settings.redis_sentinel_password
        url = settings.require_redis()
        if settings.redis_sentinels and url.startswith("rediss://"):
            # kombu's Sentinel transport would connect without TLS: refuse rather than leak.
            raise ConfigError("TLS to Redis behind Sentinel is not supported: use redis://")
        return cls(
            url=url,
            sentinels=settings.redis_sentinels,
            master=settings.redis_master,
            sentinel_password=secret.get_secret_value() if secret else None,
        )

    def login(self) -> dict[str, Any]:
        """The master's database, user and password, read from the URL."""
        parsed = parse_url(self.url)  # type: ignore[no-untyped-call]
        return {k: parsed[k] for k in ("db", "username", "password") if parsed.get(k) is not None}

    def sentinel_options(self) -> dict[str, Any]:
        """How to talk to the sentinels themselves."""
        options: dict[str, Any] = {
            "socket_timeout": CONNECT_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return options


@dataclass(frozen=True)
class Broker:
    """What Celery needs to reach Redis: the broker URL and kombu transport options."""

    url: str
    transport_options: dict[str, Any]


def sync_client(settings: Settings) -> Redis:
    """A client for the worker, the webhook sender, the scaler and the probes (str replies)."""
    target = RedisTarget.of(settings)
    options = _options(settings.redis_timeout_s) | {"retry": _retry()}
    if not target.sentinels:
        return Redis.from_url(target.url, **options)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_options())  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(target.master, **options, **target.login())  # type: ignore[no-untyped-call]
    return client


def async_client(settings: Settings, *, max_connections: int | None = None) -> AsyncRedis:
    """A client for the gateway's requests (str replies)."""
    options = _options(settings.redis_timeout_s) | {"max_connections": max_connections}
    return _async(RedisTarget.of(settings), options)


def subscriber_client(settings: Settings) -> AsyncRedis:
    """A client for a pub/sub subscription: it waits in reads, so no read timeout cuts it."""
    options = _options(None) | {"socket_keepalive": True}
    return _async(RedisTarget.of(settings), options)


def celery_broker(settings: Settings) -> Broker:
    """Celery's broker URL, and the transport options that Sentinel needs."""
    target = RedisTarget.of(settings)
    if not target.sentinels:
        return Broker(target.url, {})
    login = target.login()
    user, password = login.get("username") or "", login.get("password")
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
    db = login.get("db", 0)
    url = ";".join(f"sentinel://{auth}{_host(h)}:{p}/{db}" for h, p in target.sentinels)
    options = {"master_name": target.master, "sentinel_kwargs": target.sentinel_options()}
    return Broker(url, options)


def _options(timeout_s: float | None) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
    }


def _async(target: RedisTarget, options: dict[str, Any]) -> AsyncRedis:
    options = options | {"retry": _async_retry()}
    if not target.sentinels:
        return AsyncRedis.from_url(target.url, **options)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=target.sentinel_options())  # type: ignore[no-untyped-call]
    client: AsyncRedis = sentinel.master_for(target.master, **options, **target.login())
    return client


def _retry() -> Retry:
    return Retry(_backoff(), RETRIES, (RedisConnectionError,))


def _async_retry() -> AsyncRetry:
    return AsyncRetry(_backoff(), RETRIES, (RedisConnectionError,))


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
