"""Tenants and their API keys: who a key belongs to, what role it has, and the tenant's limits.

Keys made by `dq keys create` are kept only as SHA-256 digests (`keys.API_KEYS`), with a public
id to list and revoke them by; a tenant may have two live keys at a time, for a rotation. Keys
from `DQ_API_KEYS` are hashed at start-up and never written anywhere. A tenant's limits are the
settings' defaults, overridden field by field by its hash `dq:tenant:<name>` (the dispatch
script reads `weight` and `max_running` there too). Every change is announced on
`keys.KEY_CHANGES`, so that gateways drop what they cached within a second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import keys
from core.errors import ConfigError
from core.jobs import Priority
from core.settings import TENANT_NAME as TENANT_PATTERN
from core.settings import Settings
from core.signing import SECRET_PREFIX

KEY_PREFIX = "dqk_"  # recognisable in a leaked-secret scan
KEY_BYTES = 32
LIVE_KEYS_PER_TENANT = 2  # the old one and the new one, during a rotation
TENANT_NAME = re.compile(f"^{TENANT_PATTERN}$")


class Role(StrEnum):
    """What a key may do."""

    USER = "user"  # its tenant's own jobs
    ADMIN = "admin"  # also the whole queue, any job, dispatch pause and resume


class KeyRecord(BaseModel):
    """A managed key as the store keeps it (never the key itself)."""

    id: str
    tenant: str
    role: Role = Role.USER
    created_at: float


class Identity(BaseModel):
    """Who a request's key belongs to."""

    tenant: str
    role: Role = Role.USER
    key_id: str = "static"


class TenantLimits(BaseModel):
    """A tenant's share and limits (0 means no limit)."""

    weight: float = Field(1.0, gt=0)
    rate: float = Field(20.0, ge=0, description="submits per second")
    burst: int = Field(200, ge=1)
    max_queued: int = Field(1000, ge=0)
    max_running: int = Field(0, ge=0)
    quota_units: float = Field(0.0, ge=0)
    quota_window_s: float = Field(3600.0, gt=0)
    max_job_units: float = Field(64.0, ge=0)
    max_priority: Priority = "high"
    read_rate: float = Field(200.0, ge=0)
    read_burst: int = Field(400, ge=1)
    retention_s: float = Field(7 * 86_400, gt=0, description="how long finished jobs are kept")

    @classmethod
    def of(cls, settings: Settings) -> TenantLimits:
        """The defaults every tenant gets unless its settings say otherwise."""
        return cls(
            weight=settings.tenant_weight,
            rate=settings.tenant_rate,
            burst=settings.tenant_burst,
            max_queued=settings.tenant_max_queued,
            max_running=settings.tenant_max_running,
            quota_units=settings.tenant_quota_units,
            quota_window_s=settings.tenant_quota_window_s,
            max_job_units=settings.tenant_max_job_units,
            max_priority=settings.tenant_max_priority,
            read_rate=settings.read_rate,
            read_burst=settings.read_burst,
            retention_s=settings.job_ttl_s,
        )

    def merged(self, overrides: dict[str, str]) -> TenantLimits:
        """These limits with a tenant's own values over them."""
        known = {k: v for k, v in overrides.items() if k in TenantLimits.model_fields}
        return self.model_validate({**self.model_dump(), **known})

    def admission(self) -> dict[str, float]:
        """What the submit script checks (0: off)."""
        return {
            "rate": self.rate,
            "burst": self.burst,
            "max_queued": self.max_queued or 10**12,
            "quota": self.quota_units,
            "quota_window": self.quota_window_s,
        }


def hash_key(key: str) -> str:
    """Keys are kept only as SHA-256 digests."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: the prefix and 32 random bytes, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def static_identities(settings: Settings) -> dict[str, Identity]:
    """DQ_API_KEYS, hashed (Settings.tenants refuses malformed and too-short keys)."""
    return {
        hash_key(key): Identity(tenant=tenant, role=Role(role))
        for key, (tenant, role) in settings.tenants().items()
    }


def webhook_secret(secret_key: bytes, tenant: str, version: int) -> str:
    """A tenant's webhook signing secret, derived from the deployment's key (nothing stored)."""
    raw = hmac.new(secret_key, f"webhook:{tenant}:{version}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


def webhook_versions(raw: str | None) -> list[int]:
    """The secret versions that sign a tenant's webhooks (two during a rotation)."""
    return [int(v) for v in (raw or "1").split(",") if v.strip()]


def signing_secrets(settings: Settings, tenant: str, versions: str | None) -> list[str]:
    """The secrets that sign a tenant's webhooks.

    Secrets the operator configured come first: the tenant's own (DQ_WEBHOOK_SECRETS), else the
    shared one (DQ_WEBHOOK_SECRET, only when the operator sets it). Otherwise each tenant has its
    own, derived from DQ_SECRET_KEY and its secret version(s); `dq keys webhook-secret` shows it.
    """
    configured = settings.webhook_signing_secrets(tenant)
    if configured:
        return configured
    if settings.secret_key is None or not settings.secret_key.get_secret_value():
        return []
    key = settings.secret_key.get_secret_value().encode()
    return [webhook_secret(key, tenant, v) for v in webhook_versions(versions)]


class KeyStore:
    """Managed keys and tenant settings, for the `dq keys` command and the tests."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def create(self, tenant: str, role: Role = Role.USER) -> tuple[str, KeyRecord]:
        """A new key for `tenant` (shown once; only its hash is kept)."""
        if not TENANT_NAME.match(tenant):
            raise ConfigError(f"tenant names are letters, digits, '.', '_' or '-', not {tenant!r}")
        live = [r for r in self.records() if r.tenant == tenant]
        if len(live) >= LIVE_KEYS_PER_TENANT:
            ids = ", ".join(r.id for r in live)
            raise ConfigError(
                f"tenant {tenant!r} already has {len(live)} live keys ({ids}): revoke one first"
            )
        key = new_key()
        record = KeyRecord(
            id="key_" + secrets.token_hex(6), tenant=tenant, role=role, created_at=time.time()
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.API_KEYS, hash_key(key), record.model_dump_json())
        pipe.set(keys.KEYS_MANAGED, "1")  # revoking every key later must not open the API
        pipe.execute()
        self._announce()
        return key, record

    def records(self) -> list[KeyRecord]:
        """Every live managed key, oldest first."""
        rows = self.redis.hvals(keys.API_KEYS)
        records = [KeyRecord.model_validate_json(r, extra="ignore") for r in rows]  # type: ignore[union-attr]
        return sorted(records, key=lambda r: r.created_at)

    def revoke(self, key_id: str) -> bool:
        """Delete a key by its id; every gateway refuses it within a second."""
        for digest, raw in self.redis.hgetall(keys.API_KEYS).items():  # type: ignore[union-attr]
            if KeyRecord.model_validate_json(raw, extra="ignore").id == key_id:
                self.redis.hdel(keys.API_KEYS, digest)
                self._announce()
                return True
        return False

    def tenant_settings(self, tenant: str) -> dict[str, str]:
        """A tenant's own settings (overrides of the defaults)."""
        return {str(k): str(v) for k, v in self.redis.hgetall(keys.tenant(tenant)).items()}  # type: ignore[union-attr]

    def set_limits(self, tenant: str, values: dict[str, Any]) -> None:
        """Override some of a tenant's limits (validated against the defaults' types)."""
        # Raises if a value is malformed for its field.
        TenantLimits.model_validate({}).merged({k: str(v) for k, v in values.items()})
        unknown = set(values) - set(TenantLimits.model_fields)
        if unknown:
            raise ConfigError(
                f"unknown limits {sorted(unknown)}: use {sorted(TenantLimits.model_fields)}"
            )
        if values:
            self.redis.hset(keys.tenant(tenant), mapping={k: str(v) for k, v in values.items()})
        self._announce()

    def rotate_webhook_secret(self, tenant: str, *, finish: bool = False) -> list[int]:
        """Start a rotation (old and new sign), or finish it (only the newest); the versions."""
        versions = webhook_versions(self.tenant_settings(tenant).get("webhook_versions"))
        versions = versions[-1:] if finish else [versions[-1], versions[-1] + 1]
        self.redis.hset(keys.tenant(tenant), "webhook_versions", ",".join(map(str, versions)))
        self._announce()
        return versions

    def _announce(self) -> None:
        self.redis.publish(keys.KEY_CHANGES, "keys")


class AsyncKeyStore:
    """Key and tenant lookups for the gateway."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis

    async def lookup(self, digest: str) -> Identity | None:
        """The identity of a managed key's digest, or None."""
        raw = await self.redis.hget(keys.API_KEYS, digest)  # type: ignore[misc]
        if not raw:
            return None
        record = KeyRecord.model_validate_json(raw, extra="ignore")
        return Identity(tenant=record.tenant, role=record.role, key_id=record.id)

    async def tenant_settings(self, tenant: str) -> dict[str, str]:
        """A tenant's own settings."""
        raw = await self.redis.hgetall(keys.tenant(tenant))  # type: ignore[misc]
        return {str(k): str(v) for k, v in raw.items()}
