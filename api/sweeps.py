"""The gateway offers to run the recovery sweep too, so that recovery runs in every shape of
deployment: with KEDA and no dq scaler, with every worker scaled to zero (deadlines and expiry
still come due). A lock in Redis lets one process of the whole deployment sweep per interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from core import connections
from core.recovery import Recovery, RecoveryConfig
from core.settings import Settings
from core.storage import ObjectStore
from core.store import JobStore, Ledger

log = logging.getLogger(__name__)


class Sweeps:
    """A task offering the sweep every interval, in a thread (the sweep's calls block)."""

    def __init__(self, settings: Settings, storage: ObjectStore) -> None:
        redis = connections.sync_client(settings)
        store = JobStore(redis, Ledger.of(settings))
        prefix = getattr(storage, "prefix", "")
        self.recovery = Recovery(redis, store, RecoveryConfig.of(settings), storage, prefix)
        self.interval_s = settings.sweep_interval_s
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin offering (in the gateway's event loop)."""
        self.task = asyncio.create_task(self._run(), name="dq-sweeps")

    async def stop(self) -> None:
        """Stop offering."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.recovery.offer)
            except Exception as e:  # a loop boundary: Redis away, a bug in one part
                log.warning("recovery sweep not run: %s", e)
            await asyncio.sleep(self.interval_s)
