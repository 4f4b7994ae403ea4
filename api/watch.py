"""Job changes pushed to waiting requests: one Redis subscription per gateway process.

The ledger's transition script publishes "<job id> <status>" on `keys.CHANGES` after every write. A
request that waits on a job (a long poll, an event stream) registers here and sleeps until its job
changes, instead of reading Redis in a loop. Pub/sub is fire-and-forget, so a waiter is also woken
when the subscription is (re)established, and re-reads the ledger at least every `FALLBACK_S`
anyway: a lost message costs latency, never a missed result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import keys

log = logging.getLogger(__name__)

FALLBACK_S = 5.0  # the longest a waiter sleeps without reading the ledger, while subscribed
UNSUBSCRIBED_S = 0.5  # the same while the subscription is down
RECONNECT_S = (0.1, 2.0)  # first and longest pause between subscription attempts


class Waiter:
    """One waiting request: woken by its job's changes, or only by those to `statuses`."""

    def __init__(self, statuses: Collection[str] | None) -> None:
        self.statuses = None if statuses is None else frozenset(statuses)
        self.event = asyncio.Event()

    def notify(self, status: str | None) -> None:
        """A change (None: any change may have been missed)."""
        if status is None or self.statuses is None or status in self.statuses:
            self.event.set()

    async def changed(self, within_s: float, *, subscribed: bool) -> bool:
        """Sleep until woken or at most `within_s` (less while unsubscribed); True if woken."""
        limit = min(within_s, FALLBACK_S if subscribed else UNSUBSCRIBED_S)
        try:
            await asyncio.wait_for(self.event.wait(), timeout=max(0.0, limit))
        except TimeoutError:
            return False
        finally:
            self.event.clear()
        return True


class Watcher:
    """Listens on the change channel and wakes the waiters of each job that changed."""

    def __init__(self, redis: Redis) -> None:
        # Its own client (connections.subscriber_client): a subscribed connection blocks in reads
        # that the request clients' socket timeout would cut.
        self.redis = redis
        self.waiters: dict[str, set[Waiter]] = {}
        self.subscribed = False
        # Called when the key store announces a change (and on every resubscription).
        self.on_keys: Callable[[], None] = lambda: None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin listening (in the gateway's event loop)."""
        self.task = asyncio.create_task(self._listen(), name="dq-watcher")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.redis.aclose()

    @contextlib.contextmanager
    def watch(self, job_id: str, statuses: Collection[str] | None = None) -> Iterator[Waiter]:
        """Register a waiter for `job_id` (before reading the job, so no change slips between)."""
        waiter = Waiter(statuses)
        self.waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiting = self.waiters.get(job_id)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self.waiters[job_id]

    def dispatch(self, data: str) -> None:
        """Wake the waiters of the job a message names."""
        job_id, _, status = data.partition(" ")
        for waiter in self.waiters.get(job_id, ()):
            waiter.notify(status)

    def _wake_all(self) -> None:
        for waiting in self.waiters.values():
            for waiter in waiting:
                waiter.notify(None)

    async def _listen(self) -> None:
        pause = RECONNECT_S[0]
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.CHANGES, keys.KEY_CHANGES)
                    self.subscribed, pause = True, RECONNECT_S[0]
                    self._wake_all()  # whatever changed while unsubscribed was not heard
                    self.on_keys()
                    while True:
                        message = await pubsub.get_message(timeout=FALLBACK_S)
                        if message is None or message["type"] != "message":
                            continue
                        if message["channel"] == keys.KEY_CHANGES:
                            self.on_keys()
                        else:
                            self.dispatch(message["data"])
            except (RedisError, OSError) as e:
                if self.subscribed:
                    log.warning("job change subscription lost (%s); resubscribing", e)
                self.subscribed = False
                self._wake_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_S[1])
