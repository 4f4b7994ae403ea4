"""Who a bearer key belongs to, and each tenant's limits, cached by each gateway process.

Keys from DQ_API_KEYS are known at start; managed keys and tenant settings are read from Redis
and kept until the key store announces a change (on `keys.KEY_CHANGES`, which the watcher hears):
a revoked key is refused within moments on every process. While the announcement channel is
down, nothing is kept longer than a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core import keys
from core.tenants import AsyncKeyStore, Identity, Role, TenantLimits, hash_key

KEEP_S = 60.0  # how long a lookup is kept while announcements are heard
UNHEARD_KEEP_S = 1.0  # ... while they are not
PUBLIC = Identity(tenant="public", role=Role.ADMIN, key_id="open")


class Keys:
    """Key and tenant lookups for one gateway process."""

    def __init__(
        self,
        static: dict[str, Identity],
        store: AsyncKeyStore,
        defaults: TenantLimits,
        heard: Callable[[], bool] = lambda: False,
    ) -> None:
        self.static, self.store, self.defaults, self.heard = static, store, defaults, heard
        self._identities: dict[str, tuple[Identity | None, float]] = {}
        self._limits: dict[str, tuple[TenantLimits, float]] = {}
        self._managed: tuple[bool, float] | None = None

    def changed(self) -> None:
        """The key store announced a change: forget everything read from it."""
        self._identities.clear()
        self._limits.clear()
        self._managed = None

    def _fresh(self, at: float) -> bool:
        return time.monotonic() - at <= (KEEP_S if self.heard() else UNHEARD_KEEP_S)

    async def is_open(self) -> bool:
        """No key ever configured: every caller is the `public` tenant (local use only).

        Once a managed key has been made, the API stays closed, even with every key revoked.
        """
        if self.static:
            return False
        if self._managed is None or not self._fresh(self._managed[1]):
            made = await self.store.redis.exists(keys.KEYS_MANAGED)
            self._managed = (bool(made), time.monotonic())
        return not self._managed[0]

    async def identify(self, key: str) -> Identity | None:
        """The identity behind a bearer key, or None for an unknown one."""
        digest = hash_key(key)
        if digest in self.static:
            return self.static[digest]
        cached = self._identities.get(digest)
        if cached is not None and self._fresh(cached[1]):
            return cached[0]
        found = await self.store.lookup(digest)
        if len(self._identities) > 10_000:  # unknown keys must not grow the cache without bound
            self._identities.clear()
        self._identities[digest] = (found, time.monotonic())
        return found

    async def limits(self, tenant: str) -> TenantLimits:
        """A tenant's limits: the defaults with its own settings over them."""
        cached = self._limits.get(tenant)
        if cached is not None and self._fresh(cached[1]):
            return cached[0]
        limits = self.defaults.merged(await self.store.tenant_settings(tenant))
        self._limits[tenant] = (limits, time.monotonic())
        return limits
