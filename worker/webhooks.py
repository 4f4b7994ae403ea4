"""`python -m worker.webhooks`: the webhook sender, a Celery worker of its own, off the GPU's path.

The ledger's transition script pushes one delivery order per event onto the webhook queue, in the
same step as the status change. Each task re-reads the job (so the payload carries its current
state and freshly minted output URLs), checks the URL again, signs, makes one attempt and records
it on the job. A failed attempt parks the next one in the ledger's retry schedule, and a pump
thread moves due retries back onto the queue. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task, bootsteps
from celery.exceptions import Reject
from redis.exceptions import RedisError

from core import connections, keys
from core.broker import DELIVER_TASK
from core.callbacks import Attempt, deliver, is_retryable, next_delay
from core.deliveries import DeliveryLog, RetrySchedule
from core.events import DeliveryOrder, DeliveryRecord, Outcome, payload
from core.jobs import to_datetime
from core.records import JobRecord
from core.settings import Settings
from core.signing import signature_headers
from core.storage import ObjectStore, open_store
from core.store import JobStore, Ledger
from core.tenants import signing_secrets
from core.tracing import Tracing
from core.urlguard import GuardedUrl, HostNotFound, Resolver, UnsafeUrl, check_url, resolve_host
from core.views import outputs_with_urls, public_job
from worker.celeryapp import at_least_once, run

log = logging.getLogger(__name__)

PUMP_INTERVAL_S = 0.25
# Where `dq up` serves the gateway; local image URLs in payloads are absolute against it.
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"


class TenantSlots:
    """How many deliveries each tenant has in flight in this process, up to `limit` each.

    The sender's threads are shared: without a cap, one tenant's receiver that never answers
    would hold every thread for its timeout while other tenants' events wait.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy: dict[str, int] = {}
        self.lock = threading.Lock()  # guards `busy`, taken by every delivery thread

    def take(self, tenant: str) -> bool:
        """A slot for `tenant`, if it has one free."""
        with self.lock:
            if self.busy.get(tenant, 0) >= self.limit:
                return False
            self.busy[tenant] = self.busy.get(tenant, 0) + 1
            return True

    def give_back(self, tenant: str) -> None:
        """Free a slot taken with `take`."""
        with self.lock:
            left = self.busy.get(tenant, 1) - 1
            if left:
                self.busy[tenant] = left
            else:
                self.busy.pop(tenant, None)


BUSY_RETRY_S = 1.0  # an order whose tenant has every slot busy comes back this much later


@dataclass
class Sender:
    """What a delivery needs, made once per process."""

    settings: Settings
    store: JobStore
    log: DeliveryLog
    retries: RetrySchedule
    storage: ObjectStore
    base_url: str
    rng: random.Random = field(default_factory=random.Random)
    resolve: Resolver = resolve_host
    slots: TenantSlots = field(default_factory=lambda: TenantSlots(2))
    tracing: Tracing = field(default_factory=Tracing)  # off unless OTEL_* asks for it


def build_sender(settings: Settings, tracing: Tracing | None = None) -> Sender:
    """Connect the sender to Redis and storage."""
    redis = connections.sync_client(settings)
    storage = open_store(
        settings.storage,
        secret=url_secret(settings),
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    return Sender(
        settings=settings,
        store=JobStore(redis, Ledger.of(settings)),
        log=DeliveryLog(redis, settings.job_ttl_s),
        retries=RetrySchedule(redis, settings.webhook_queue),
        storage=storage,
        base_url=settings.public_url or DEFAULT_PUBLIC_URL,
        slots=TenantSlots(settings.webhook_tenant_concurrency),
        tracing=tracing or Tracing(),
    )


def url_secret(settings: Settings) -> bytes:
    """The gateway's key for local file URLs, so links in payloads open."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    log.warning("DQ_SECRET_KEY is not set: local image URLs in webhook payloads will not open")
    return secrets.token_bytes(32)


# --- one delivery ------------------------------------------------------------------------------


def send(sender: Sender, order: DeliveryOrder) -> DeliveryRecord | None:
    """Make one attempt of `order` and record it; None when the job or its webhook is gone, or
    when its tenant has every delivery slot busy (the order comes back shortly, same attempt)."""
    record = sender.store.get(order.job_id)
    if record is None or record.webhook is None:
        log.info("job %s: gone, %s not sent", order.job_id, order.event.value)
        return None
    if not sender.slots.take(record.tenant):
        sender.retries.add(order, time.time() + BUSY_RETRY_S)
        return None
    attributes = {"dq.job_id": order.job_id, "dq.event": order.event.value}
    try:
        with sender.tracing.span(
            "dq.webhook", parent=record.trace, kind="client", attributes=attributes
        ):
            return attempt_once(sender, order, record)
    finally:
        sender.slots.give_back(record.tenant)


def attempt_once(sender: Sender, order: DeliveryOrder, record: JobRecord) -> DeliveryRecord:
    """One attempt of a job's event: checked, signed, posted, and its outcome recorded."""
    assert record.webhook is not None
    if not order.manual and receiver_gone(sender.log.read(order.job_id)):
        return give_up(sender, order, "skipped", "the receiver answered 410 Gone; not sent")
    signers = tenant_secrets(sender, record.tenant)
    if not signers:
        return give_up(sender, order, "refused", "no webhook secret is configured to sign with")
    try:
        target = check_url(
            record.webhook.url,
            allow_private=sender.settings.webhook_allow_private,
            resolve=sender.resolve,
        )
    except HostNotFound as e:
        attempt = Attempt(None, e.reason, None, 0.0)  # DNS may be failing for a moment: retry
    except UnsafeUrl as e:
        return give_up(sender, order, "refused", e.reason)
    else:
        attempt = post(sender, order, record, target, signers)
    schedule = sender.settings.webhook_retry_schedule
    outcome, delay = decide(attempt, order.attempt, schedule, sender.rng)
    return settle(sender, order, attempt, outcome, delay)


def tenant_secrets(sender: Sender, tenant: str) -> list[str]:
    """The secrets that sign this tenant's deliveries (its own by default)."""
    versions = sender.store.redis.hget(keys.tenant(tenant), "webhook_versions")
    return signing_secrets(sender.settings, tenant, None if versions is None else str(versions))


def post(
    sender: Sender,
    order: DeliveryOrder,
    record: JobRecord,
    target: GuardedUrl,
    signers: list[str],
) -> Attempt:
    """Sign the job's current JSON and POST it once to the checked addresses."""
    settings = sender.settings
    outputs = outputs_with_urls(record.outputs, sender.storage, settings.url_ttl_s, sender.base_url)
    job = public_job(record, outputs=outputs).model_dump(mode="json", exclude={"webhook"})
    body = payload(order, job, record.tenant)
    headers = signature_headers(signers, order.webhook_id, int(time.time()), body)
    headers |= sender.tracing.headers()  # the receiver may continue the job's trace
    return deliver(
        target,
        body,
        headers,
        connect_timeout=settings.webhook_connect_timeout_s,
        total_timeout=settings.webhook_timeout_s,
    )


def decide(
    attempt: Attempt, attempt_no: int, schedule: tuple[float, ...], rng: random.Random
) -> tuple[Outcome, float | None]:
    """What follows an attempt: delivered, gone (410), a retry in so many seconds, or giving up."""
    if attempt.ok:
        return "delivered", None
    if not is_retryable(attempt):
        return ("gone" if attempt.status_code == 410 else "gave_up"), None
    delay = next_delay(attempt_no, schedule, attempt.retry_after_s, rng)
    return ("gave_up", None) if delay is None else ("retrying", delay)


def receiver_gone(entries: list[DeliveryRecord]) -> bool:
    """True when the receiver's latest answer was 410 Gone: it asked for no more events."""
    answered = [e for e in entries if e.outcome != "skipped"]
    return bool(answered) and answered[-1].outcome == "gone"


def give_up(sender: Sender, order: DeliveryOrder, outcome: Outcome, reason: str) -> DeliveryRecord:
    """Record an order that was not sent, with why."""
    return settle(sender, order, Attempt(None, reason, None, 0.0), outcome, None)


def settle(
    sender: Sender, order: DeliveryOrder, attempt: Attempt, outcome: Outcome, delay: float | None
) -> DeliveryRecord:
    """Park the next attempt when there is one, and log this one on the job."""
    now = time.time()
    due = None if delay is None else now + delay
    if due is not None:
        sender.retries.add(order.retry(), due)
    entry = DeliveryRecord(
        event=order.event,
        webhook_id=order.webhook_id,
        attempt=order.attempt,
        at=to_datetime(now),  # type: ignore[arg-type]
        outcome=outcome,
        status_code=attempt.status_code,
        error=attempt.error,
        next_retry_at=to_datetime(due),
    )
    sender.log.append(order.job_id, entry)
    sender.tracing.note(attempt=order.attempt, outcome=outcome, status_code=attempt.status_code)
    if outcome not in ("delivered", "gone"):
        sender.tracing.fail(attempt.error or f"HTTP {attempt.status_code}")
    log.info(
        "job %s: %s %s attempt %d: %s (%s)",
        order.job_id,
        order.event.value,
        order.webhook_id,
        order.attempt,
        outcome,
        attempt.status_code or attempt.error,
    )
    return entry


# --- the Celery side ---------------------------------------------------------------------------


class DeliverTask(Task):  # type: ignore[misc]
    """Make one delivery attempt of one event."""

    name = DELIVER_TASK
    acks_late = True

    def run(self, order: dict[str, Any]) -> None:
        """Send; when the ledger is unreachable, hand the order back to the queue."""
        parsed = DeliveryOrder.model_validate(order)
        try:
            send(self.app.dq_sender, parsed)
        except RedisError as e:
            log.warning("job %s: Redis unavailable (%s); event requeued", parsed.job_id, e)
            time.sleep(1)
            raise Reject(requeue=True) from e


class RetryPump:
    """A thread that moves due retries from the schedule back onto the delivery queue."""

    def __init__(self, retries: RetrySchedule, interval_s: float = PUMP_INTERVAL_S) -> None:
        self.retries = retries
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="dq-retry-pump", daemon=True)

    def start(self) -> None:
        """Start pumping."""
        self.thread.start()

    def stop(self) -> None:
        """Stop pumping; parked retries stay in Redis for the next sender."""
        self.stopped.set()
        self.thread.join(2)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.retries.release_due(time.time())
            except RedisError as e:
                log.warning("retry pump: Redis unavailable (%s); retrying in 1 s", e)
                self.stopped.wait(1)
            except Exception:
                # The top of a thread is a loop boundary: a thread that died here would leave
                # every parked retry parked, and the sender looking healthy.
                log.exception("retry pump failed; retrying in 1 s")
                self.stopped.wait(1)


class SenderStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Builds the sender with the worker and runs the retry pump beside it."""

    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> None:
        """Connect the sender; tasks find it on the app."""
        tracing = getattr(worker.app, "dq_tracing", None)
        worker.app.dq_sender = build_sender(worker.app.dq_settings, tracing)
        self.pump = RetryPump(worker.app.dq_sender.retries)

    def start(self, worker: Any) -> None:
        """Start the pump."""
        self.pump.start()

    def stop(self, worker: Any) -> None:
        """Stop the pump."""
        self.pump.stop()


def create_sender_celery(settings: Settings) -> Celery:
    """A Celery app consuming the webhook queue with a pool of threads (the work is waiting)."""
    app = at_least_once(
        "diffusion-queue-webhooks",
        settings,
        settings.webhook_queue,
        worker_concurrency=settings.webhook_concurrency,
        worker_prefetch_multiplier=1,
    )
    app.register_task(DeliverTask())
    app.steps["worker"].add(SenderStep)
    return app


def sender_args(settings: Settings, name: str | None) -> list[str]:
    """A pool of threads: each delivery mostly waits on the network."""
    hostname = name or f"dq-webhooks-{os.getpid()}@{socket.gethostname()}"
    return [
        "--pool=threads",
        f"--concurrency={settings.webhook_concurrency}",
        f"--queues={settings.webhook_queue}",
        f"--hostname={hostname}",
    ]


def main(argv: list[str] | None = None) -> None:
    """Start a webhook sender on the webhook queue."""
    prog = "python -m worker.webhooks"
    run(prog, __doc__, create_sender_celery, sender_args, argv, service="dq-webhooks")


if __name__ == "__main__":
    main()
