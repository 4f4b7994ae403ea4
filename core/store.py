"""The Redis job ledger: the only code that writes a job's status, and the owner of the queue.

A queued job waits in its tenant's line for its model and priority class until dispatch moves it
into the model's window (its Celery message goes out then); a worker's claim makes it running.
Every change runs one Lua script (core/lua) that compares before it writes: a claim takes only a
dispatched job and numbers the attempt itself; a renewal or an outcome is accepted only from the
attempt and worker that hold the job; terminal states never change. The same script keeps the
indexes and counters, creates the change's webhook event, publishes "<job id> <status>" on
`keys.CHANGES`, and dispatches when a place in the window (or a tenant's running cap) frees up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import keys, metrics, scripts
from core.broker import delivery_message, generate_template, job_queue
from core.coalesce import ScriptBatcher
from core.errors import IllegalTransition
from core.events import DeliveryOrder, EventType, event_entering, webhook_id
from core.jobs import (
    ErrorInfo,
    JobStatus,
)
from core.records import JobRecord, Read, decode, decode_many, encode, salvage
from core.settings import Settings

TOMBSTONE_S = 60  # a deleted job's record lingers this long, refusing late writes, then goes
Op = Literal["claim", "renew", "finish", "handback", "undispatch", "cancel", "fail"]
# The status each operation leads to (finish: the change's own `to`).
_TARGET: dict[str, JobStatus] = {
    "claim": JobStatus.RUNNING,
    "renew": JobStatus.RUNNING,
    "handback": JobStatus.QUEUED,
    "undispatch": JobStatus.QUEUED,
    "cancel": JobStatus.CANCELED,
    "fail": JobStatus.FAILED,
}


@cache
def _template() -> str:
    return generate_template()


@dataclass(frozen=True)
class DispatchConfig:
    """What every script that may dispatch needs to know (the same in every process)."""

    queue: str = "dq.jobs"  # base name: a model's Celery queue is `<queue>.<model>`
    margin: int = 2  # jobs dispatched beyond the live workers' next batches (for ones on their way)
    heartbeat_ttl_s: float = 15.0  # a worker is live while its heartbeat is this fresh
    fifo: bool = False  # arrival order for everyone (the comparison mode)
    low_max_wait_s: float = 120.0  # a `low` job waiting this long goes next (its aging bound)
    weight: float = 1.0  # a tenant's share, unless its settings say otherwise
    max_running: int = 1_000_000  # a tenant's dispatched + running jobs, unless ... otherwise
    max_per_call: int = 64  # jobs one script call dispatches at most

    @classmethod
    def of(cls, settings: Settings) -> DispatchConfig:
        """The dispatch settings every process shares."""
        return cls(
            queue=settings.queue_name,
            margin=settings.dispatch_margin,
            heartbeat_ttl_s=settings.heartbeat_s * 3,
            fifo=settings.dispatch == "fifo",
            low_max_wait_s=settings.low_priority_max_wait_s,
            weight=settings.tenant_weight,
            max_running=settings.tenant_max_running or 1_000_000,
        )

    def table(self, now: float) -> dict[str, Any]:
        """The `d` argument of a script."""
        return {
            "now": now,
            "margin": self.margin,
            "ttl": self.heartbeat_ttl_s,
            "fifo": self.fifo,
            "low_age": self.low_max_wait_s,
            "weight": self.weight,
            "max_running": self.max_running,
            "queue": self.queue,
            "template": _template(),
            "max_per_call": self.max_per_call,
        }


@dataclass(frozen=True)
class Ledger:
    """The names and limits every store shares."""

    job_ttl_s: int = 7 * 86_400
    max_queue: int = 10_000
    idempotency_ttl_s: int = 86_400
    webhook_queue: str = "dq.webhooks"
    progress_event_s: float = 5.0
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)

    @classmethod
    def of(cls, settings: Settings) -> Ledger:
        """The ledger limits every process shares."""
        return cls(
            job_ttl_s=settings.job_ttl_s,
            max_queue=settings.max_queue,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            webhook_queue=settings.webhook_queue,
            progress_event_s=settings.webhook_progress_interval_s,
            dispatch=DispatchConfig.of(settings),
        )

    def queue_of(self, model: str) -> str:
        """The Celery queue of one model's jobs."""
        return job_queue(self.dispatch.queue, model)

    def change_args(self, change: Change, now: float) -> str:
        """The JSON argument of one transition script call."""
        to = change.to if change.op == "finish" else _TARGET[change.op]
        assert to is not None, "a finish names its status"
        stay = EventType.PROGRESS if change.op == "renew" and "progress" in change.fields else None
        fields = encode(**change.fields)
        table: dict[str, Any] = {
            "op": change.op,
            "id": change.job_id,
            "now": now,
            "to": to.value,
            "fields": [item for pair in fields.items() for item in pair],
            "ttl": self.job_ttl_s,
            "enter": self.event(change.job_id, event_entering(to.value), now),
            "stay": self.event(change.job_id, stay, now),
            "progress_every": self.progress_event_s,
            "webhook_queue": self.webhook_queue,
            "incr": [list(pair) for pair in change.incr],
            "d": self.dispatch.table(now),
        }
        for name in ("attempt", "worker", "lease", "cutoff"):
            table[name] = getattr(change, name)
        if to.terminal:
            table |= metrics.ending(change.fields)
            table["max_tenants"] = metrics.MAX_TENANTS
        # Lua sees JSON null as a value (cjson.null), not as nil: leave absent what is None.
        return json.dumps({k: v for k, v in table.items() if v is not None})

    def submit_args(
        self,
        record: JobRecord,
        limits: Mapping[str, float],
        idempotency: tuple[str, str] | None,
        deadline: float | None,
    ) -> str:
        """The JSON argument of one submit script call."""
        fields = encode(
            tenant=record.tenant,
            status=record.status.value,
            attempt=0,
            created_at=record.created_at,
            request=record.request,
            metrics=record.metrics,
            model=record.model,
            priority=record.priority,
            units=record.units,
            images=record.request.num_images,
            deadline_at=deadline,
        )
        if record.trace is not None:
            fields["trace"] = record.trace
        if record.webhook is not None:
            # The transition script reads the plain list; the API reads the JSON.
            fields["webhook"] = record.webhook.model_dump_json()
            fields["webhook_events"] = " ".join(record.webhook.events)
        idem_key, idem_value = idempotency or ("", "")
        table = {
            "id": record.id,
            "tenant": record.tenant,
            "model": record.model,
            "class": record.priority,
            "units": record.units,
            "images": record.request.num_images,
            "created": record.created_at,
            "fields": [item for pair in fields.items() for item in pair],
            "index": keys.tenant_jobs(record.tenant),
            "idem_key": idem_key,
            "idem_value": idem_value,
            "idem_ttl": self.idempotency_ttl_s,
            "max_queue": self.max_queue,
            "limits": dict(limits),
            "deadline": deadline,
            "d": self.dispatch.table(time.time()),
        }
        return json.dumps({k: v for k, v in table.items() if v is not None})

    def event(self, job_id: str, event: EventType | None, now: float) -> dict[str, str] | None:
        """The webhook event a change creates if the job's webhook wants it."""
        if event is None:
            return None
        # Progress events are many per job; the time keeps their ids apart.
        suffix = str(int(now * 1000)) if event is EventType.PROGRESS else ""
        order = DeliveryOrder(
            job_id=job_id,
            event=event,
            webhook_id=webhook_id(job_id, event, suffix),
            occurred_at=now,
        )
        return {
            "type": event.value,
            "order": order.model_dump_json(),
            "message": delivery_message(order, self.webhook_queue),
        }


@dataclass(frozen=True)
class Change:
    """One status change of one job (see core/lua/transition.lua for what each op checks)."""

    op: Op
    job_id: str
    attempt: int | None = None  # the attempt that must hold the job (claim: ignored)
    worker: str | None = None  # the worker that claims, or must hold the job
    lease: float | None = None  # the running lease's deadline (claim, renew)
    cutoff: float | None = None  # refuse unless the lease or dispatch ended by then
    to: JobStatus | None = None  # finish: succeeded or failed
    fields: Mapping[str, Any] = field(default_factory=dict)
    incr: Sequence[tuple[str, float]] = ()  # metrics counters, added once if applied


@dataclass(frozen=True)
class Applied:
    """What a change did: whether it applied, the status before, the attempt after."""

    ok: bool
    before: str
    attempt: int


def _applied(reply: Sequence[Any]) -> Applied:
    outcome, before, attempt = (_text(v) for v in reply)
    return Applied(outcome == "ok", before, int(attempt or 0))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def quarantine_change(job_id: str, raw_request: str | None, reason: str) -> Change:
    """The change that fails a job whose record cannot be read, keeping what can be kept."""
    error = ErrorInfo(
        code="unreadable_record",
        message="the job's stored record could not be read; it was set aside and will not run",
    )
    fields = {"finished_at": time.time(), "error": error, "request": salvage(raw_request)}
    fields["quarantined"] = reason
    return Change("fail", job_id, fields=fields)


class JobStore:
    """Synchronous ledger access for the worker, the recovery sweep and the scaler."""

    def __init__(self, redis: Redis, ledger: Ledger) -> None:
        self.redis = redis
        self.ledger = ledger
        self._transition = redis.register_script(scripts.source("transition"))
        self._dispatch = redis.register_script(scripts.source("dispatch"))
        self._submit = redis.register_script(scripts.source("submit"))

    def submit(
        self,
        record: JobRecord,
        limits: Mapping[str, float] | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> Admission:
        """Admit a job (the gateway's path, for tools and tests that have no gateway)."""
        args = self.ledger.submit_args(record, limits or {}, idempotency, None)
        return _admission(self._submit([], [args]))  # type: ignore[arg-type]

    def get(self, job_id: str) -> JobRecord | None:
        """One job's record (UnreadableRecord if it cannot be parsed)."""
        return decode(job_id, self.redis.hgetall(keys.job(job_id)))  # type: ignore[arg-type]

    def get_many(self, job_ids: Iterable[str]) -> list[Read]:
        """Several records in one round trip."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return decode_many(ids, pipe.execute())

    def apply(self, changes: Sequence[Change]) -> list[Applied]:
        """Several changes in one round trip, each its own compare-and-set."""
        if not changes:
            return []
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for change in changes:
            self._transition([], [self.ledger.change_args(change, now)], client=pipe)
        return [_applied(reply) for reply in pipe.execute()]

    def change(self, change: Change) -> Applied:
        """One change."""
        return self.apply([change])[0]

    def must(self, change: Change) -> Applied:
        """One change that must apply (IllegalTransition otherwise)."""
        applied = self.change(change)
        if not applied.ok:
            raise IllegalTransition(change.job_id, applied.before or None, change.op)
        return applied

    def quarantine(self, job_id: str) -> bool:
        """Fail a job whose record cannot be read, so that no loop trips on it again."""
        raw = self.redis.hget(keys.job(job_id), "request")
        change = quarantine_change(job_id, raw, "unreadable")  # type: ignore[arg-type]
        return self.change(change).ok

    def dispatch(self, model: str) -> int:
        """Fill a model's window now; how many jobs went out."""
        table = {"model": model, "d": self.ledger.dispatch.table(time.time())}
        return int(self._dispatch([], [json.dumps(table)]))  # type: ignore[arg-type]

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """The current status of each job, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [JobStatus(s) if s else None for s in pipe.execute()]


@dataclass(frozen=True)
class Admission:
    """The submit script's answer."""

    outcome: Literal["created", "duplicate", "full", "limited"]
    value: str = ""  # the job id, or the stored idempotency value
    position: int | None = None  # created: 1 = next
    units_ahead: float = 0.0
    limit: str = ""  # limited: which limit
    retry_after_s: float = 0.0
    limit_value: float = 0.0
    remaining: float = 0.0


def _admission(reply: Sequence[Any]) -> Admission:
    parts = [_text(v) for v in reply]
    outcome = parts[0]
    if outcome == "created":
        return Admission("created", parts[1], int(parts[2]), float(parts[3]))
    if outcome == "duplicate":
        return Admission("duplicate", parts[1])
    if outcome == "limited":
        return Admission(
            "limited",
            limit=parts[1],
            retry_after_s=float(parts[2]),
            limit_value=float(parts[3]),
            remaining=float(parts[4]),
        )
    return Admission("full")


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: dispatched or waiting, and what is ahead of it."""

    dispatched: bool
    jobs_ahead: int
    units_ahead: float


class AsyncJobStore:
    """Asynchronous ledger access for the gateway."""

    def __init__(self, redis: AsyncRedis, ledger: Ledger) -> None:
        self.redis = redis
        self.ledger = ledger
        self._submit = ScriptBatcher(redis, scripts.source("submit"))
        self._transition = redis.register_script(scripts.source("transition"))
        self._position = redis.register_script(scripts.source("position"))

    async def submit(
        self,
        record: JobRecord,
        *,
        limits: Mapping[str, float],
        idempotency: tuple[str, str] | None = None,
        deadline: float | None = None,
    ) -> Admission:
        """Admit a job in one atomic step: limits, record, its line, a dispatch."""
        args = self.ledger.submit_args(record, limits, idempotency, deadline)
        return _admission(await self._submit([], [args]))

    async def get(self, job_id: str) -> tuple[JobRecord | None, Place | None]:
        """A record and, while queued, its place; in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        table = {"id": job_id, "d": self.ledger.dispatch.table(time.time())}
        await self._position([], [json.dumps(table)], client=pipe)
        raw, place = await pipe.execute()
        return decode(job_id, raw), _place(place)

    async def place(self, job_id: str) -> Place | None:
        """Where a queued job stands (None unless queued)."""
        table = {"id": job_id, "d": self.ledger.dispatch.table(time.time())}
        return _place(await self._position([], [json.dumps(table)]))

    async def change(self, change: Change) -> Applied:
        """One change (a client's cancel, a quarantine)."""
        args = self.ledger.change_args(change, time.time())
        return _applied(await self._transition([], [args]))

    async def quarantine(self, job_id: str) -> bool:
        """Fail a job whose record cannot be read."""
        raw = await self.redis.hget(keys.job(job_id), "request")
        change = quarantine_change(job_id, None if raw is None else str(raw), "unreadable")
        return (await self.change(change)).ok

    async def tombstone(self, record: JobRecord) -> None:
        """Mark an ended job deleted: out of its tenant's index now, its record gone shortly."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.job(record.id), "deleted_at", time.time())
        pipe.expire(keys.job(record.id), TOMBSTONE_S)
        pipe.delete(keys.webhook_log(record.id))
        pipe.zrem(keys.tenant_jobs(record.tenant), record.id)
        pipe.zrem(keys.EXPIRING, f"{record.tenant} {record.id}")
        await pipe.execute()

    async def redeliver(self, job_id: str) -> DeliveryOrder | None:
        """Queue a job's last webhook event again: a new series of attempts, same webhook-id."""
        raw = await self.redis.hget(keys.job(job_id), "webhook_last")
        if not raw:
            return None
        order = DeliveryOrder.model_validate_json(raw).model_copy(
            update={"attempt": 1, "manual": True}
        )
        queue = self.ledger.webhook_queue
        await self.redis.lpush(queue, delivery_message(order, queue))
        return order

    async def page(self, tenant: str, before: float, limit: int) -> list[tuple[str, float]]:
        """Up to `limit` of a tenant's (job id, created) pairs created at or before `before`."""
        rows = await self.redis.zrevrangebyscore(
            keys.tenant_jobs(tenant), before, "-inf", start=0, num=limit, withscores=True
        )
        return [(_text(row[0]), float(row[1])) for row in rows]

    async def get_many(self, job_ids: Sequence[str]) -> list[Read]:
        """Several records in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return decode_many(job_ids, await pipe.execute())

    async def forget(self, tenant: str, job_ids: Sequence[str]) -> None:
        """Drop expired jobs from a tenant's index."""
        if job_ids:
            await self.redis.zrem(keys.tenant_jobs(tenant), *job_ids)

    async def counts(self) -> tuple[int, int]:
        """(queued, running) job counts."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.STATS, "queued")
        pipe.zcard(keys.RUNNING)
        queued, running = await pipe.execute()
        return int(queued or 0), int(running)


def _place(reply: Sequence[Any]) -> Place | None:
    if not reply:
        return None
    where, jobs, units = (_text(v) for v in reply)
    return Place(where == "D", int(jobs), float(units))
