"""The Redis job ledger: the only code that writes a job's status.

Every status change runs one Lua script that compares the current status (and, for writes from a
worker, the attempt number) before it writes, so a late write from a dead attempt loses and terminal
states never change. Index sets (queue positions, running leases) move in the same script, which
also publishes "<job id> <status>" on `keys.CHANGES` so that waiting clients are told, not polled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import keys
from core.coalesce import ScriptBatcher
from core.errors import IllegalTransition
from core.events import DeliveryOrder, EventType, WebhookSpec, event_entering, webhook_id
from core.jobs import (
    ErrorInfo,
    JobRequest,
    JobStatus,
    Metrics,
    Progress,
    StoredImage,
    sources_of,
)
from core.messages import delivery_message, generate_message
from core.settings import Settings

_SUBMIT = """
-- KEYS: job, queued, tenant index, broker list, idempotency key ('' for none)
-- ARGV: id, now, max_queue, message, idem_ttl, idem_value, field, value, ...
if KEYS[5] ~= '' then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {'duplicate', seen} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return {'full', ''} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[4])
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[5]) end
return {'created', ARGV[1]}
"""

_TRANSITION = """
-- KEYS: job, queued, running, broker list, webhook list, change channel
-- ARGV: id, allowed sources (space separated), expected attempt ('' = any), new status,
--       terminal ttl ('' = not terminal), index score, message ('' = none),
--       event on entering the status ('' = none), its order, its message,
--       event on staying in it ('' = none), its order, its message,
--       now, least seconds between progress events,
--       lease cutoff ('' = none; else refused unless the lease ended by then), field, value, ...
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not cur[1] then return {'missing', '', ''} end
if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. cur[1] .. ' ', 1, true) then
  return {'refused', cur[1], cur[2]}
end
if ARGV[3] ~= '' and cur[2] ~= ARGV[3] then return {'refused', cur[1], cur[2]} end
if ARGV[16] ~= '' then
  local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if lease and tonumber(lease) > tonumber(ARGV[16]) then return {'refused', cur[1], cur[2]} end
end
redis.call('HSET', KEYS[1], 'status', ARGV[4], unpack(ARGV, 17))
if ARGV[4] == 'queued' then redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
else redis.call('ZREM', KEYS[2], ARGV[1]) end
if ARGV[4] == 'running' then redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
else redis.call('ZREM', KEYS[3], ARGV[1]) end
if ARGV[7] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[7]) end
-- The webhook event of this change, created in this same step: once per (job, event type) by an
-- HSETNX marker; progress events instead at most once per interval.
local e = 8
if cur[1] == ARGV[4] then e = 11 end
local subs = redis.call('HGET', KEYS[1], 'webhook_events')
if ARGV[e] ~= '' and subs and string.find(' ' .. subs .. ' ', ' ' .. ARGV[e] .. ' ', 1, true) then
  local fresh
  if ARGV[e] == 'job.progress' then
    local last = tonumber(redis.call('HGET', KEYS[1], 'webhook_progress_at')) or 0
    fresh = tonumber(ARGV[14]) - last >= tonumber(ARGV[15])
    if fresh then redis.call('HSET', KEYS[1], 'webhook_progress_at', ARGV[14]) end
  else
    fresh = redis.call('HSETNX', KEYS[1], 'webhook_event:' .. ARGV[e], ARGV[14]) == 1
  end
  if fresh then
    redis.call('HSET', KEYS[1], 'webhook_last', ARGV[e + 1])
    redis.call('LPUSH', KEYS[5], ARGV[e + 2])
  end
end
if ARGV[5] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
redis.call('PUBLISH', KEYS[6], ARGV[1] .. ' ' .. ARGV[4])
return {'ok', cur[1], cur[2]}
"""


_REPUBLISH = """
-- KEYS: job, broker list; ARGV: message
-- A new message for a job still queued, at the front of the queue (where kombu restores).
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class JobRecord:
    """A job as the ledger holds it (the API adds URLs and queue position on read)."""

    id: str
    tenant: str
    status: JobStatus
    attempt: int
    created_at: float
    request: JobRequest
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    outputs: list[StoredImage] = field(default_factory=list)
    error: ErrorInfo | None = None
    metrics: Metrics = field(default_factory=Metrics)
    worker: str | None = None
    webhook: WebhookSpec | None = None


def encode(**values: Any) -> dict[str, str]:
    """Hash fields for a record's values: models as JSON, numbers as text."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            out[name] = ""
        elif isinstance(value, list):
            out[name] = json.dumps([v.model_dump(mode="json") for v in value])
        elif hasattr(value, "model_dump_json"):
            out[name] = value.model_dump_json()
        else:
            out[name] = str(value)
    return out


def _opt_float(raw: str | None) -> float | None:
    return float(raw) if raw else None


def decode(job_id: str, raw: Mapping[str, str]) -> JobRecord | None:
    """The record stored in a job hash, or None when the hash is gone."""
    if not raw:
        return None
    return JobRecord(
        id=job_id,
        tenant=raw["tenant"],
        status=JobStatus(raw["status"]),
        attempt=int(raw.get("attempt") or 0),
        created_at=float(raw["created_at"]),
        request=JobRequest.model_validate_json(raw["request"]),
        started_at=_opt_float(raw.get("started_at")),
        finished_at=_opt_float(raw.get("finished_at")),
        progress=Progress.model_validate_json(p) if (p := raw.get("progress")) else None,
        outputs=[StoredImage.model_validate(o) for o in json.loads(raw.get("outputs") or "[]")],
        error=ErrorInfo.model_validate_json(e) if (e := raw.get("error")) else None,
        metrics=Metrics.model_validate_json(m) if (m := raw.get("metrics")) else Metrics(),
        worker=raw.get("worker") or None,
        webhook=WebhookSpec.model_validate_json(w) if (w := raw.get("webhook")) else None,
    )


@dataclass(frozen=True)
class Ledger:
    """The names and limits every store shares."""

    queue: str = "dq.jobs"
    job_ttl_s: int = 7 * 86_400
    max_queue: int = 10_000
    idempotency_ttl_s: int = 86_400
    webhook_queue: str = "dq.webhooks"
    progress_event_s: float = 5.0

    @classmethod
    def of(cls, settings: Settings) -> Ledger:
        """The ledger limits every process shares."""
        return cls(
            queue=settings.queue_name,
            job_ttl_s=settings.job_ttl_s,
            max_queue=settings.max_queue,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            webhook_queue=settings.webhook_queue,
            progress_event_s=settings.webhook_progress_interval_s,
        )

    def transition_call(
        self,
        job_id: str,
        to: JobStatus,
        *,
        attempt: int | None,
        fields: Mapping[str, str],
        score: float | None,
        lease_ended_by: float | None = None,
    ) -> tuple[list[str], list[str | float]]:
        """Keys and arguments of one compare-and-set status change."""
        allowed = " ".join(sorted(sources_of(to)))
        message = generate_message(job_id, self.queue) if to is JobStatus.QUEUED else ""
        ttl = str(self.job_ttl_s) if to.terminal else ""
        flat = [item for pair in fields.items() for item in pair]
        now = time.time()
        stay = EventType.PROGRESS if to is JobStatus.RUNNING and "progress" in fields else None
        args: list[str | float] = [
            job_id,
            allowed,
            "" if attempt is None else str(attempt),
            to.value,
            ttl,
            now if score is None else score,
            message,
            *self.event_args(job_id, event_entering(to.value), now),
            *self.event_args(job_id, stay, now),
            now,
            self.progress_event_s,
            "" if lease_ended_by is None else lease_ended_by,
            *flat,
        ]
        keys_ = [
            keys.job(job_id),
            keys.QUEUED,
            keys.RUNNING,
            self.queue,
            self.webhook_queue,
            keys.CHANGES,
        ]
        return keys_, args

    def event_args(self, job_id: str, event: EventType | None, now: float) -> list[str]:
        """The (event, order, message) a transition pushes if the job's webhook wants it."""
        if event is None:
            return ["", "", ""]
        # Progress events are many per job; the time keeps their ids apart.
        suffix = str(int(now * 1000)) if event is EventType.PROGRESS else ""
        order = DeliveryOrder(
            job_id=job_id,
            event=event,
            webhook_id=webhook_id(job_id, event, suffix),
            occurred_at=now,
        )
        return [event.value, order.model_dump_json(), delivery_message(order, self.webhook_queue)]

    def submit_call(
        self, record: JobRecord, idempotency: tuple[str, str] | None
    ) -> tuple[list[str], list[str | float]]:
        """Keys and arguments of the atomic record-and-enqueue."""
        fields = encode(
            tenant=record.tenant,
            status=record.status.value,
            attempt=0,
            created_at=record.created_at,
            request=record.request,
            metrics=record.metrics,
        )
        if record.webhook is not None:
            # The transition script reads the plain list; the API reads the JSON.
            fields["webhook"] = record.webhook.model_dump_json()
            fields["webhook_events"] = " ".join(record.webhook.events)
        idem_key, idem_value = idempotency or ("", "")
        flat = [item for pair in fields.items() for item in pair]
        keys_ = [
            keys.job(record.id),
            keys.QUEUED,
            keys.tenant_jobs(record.tenant),
            self.queue,
            idem_key,
        ]
        args: list[str | float] = [
            record.id,
            record.created_at,
            self.max_queue,
            generate_message(record.id, self.queue),
            self.idempotency_ttl_s,
            idem_value,
            *flat,
        ]
        return keys_, args


@dataclass(frozen=True)
class Change:
    """One status change from a worker's attempt, to be written with others in one round trip."""

    job_id: str
    to: JobStatus
    expect_attempt: int
    score: float | None = None  # the running lease's deadline (or queue position)
    fields: Mapping[str, Any] = field(default_factory=dict)


def check_transition(result: Sequence[Any], job_id: str, to: JobStatus) -> None:
    """Raise IllegalTransition unless the script applied the change."""
    outcome, current = _text(result[0]), _text(result[1])
    if outcome != "ok":
        raise IllegalTransition(job_id, current or None, to.value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    """Synchronous ledger access for the worker, the reaper and the scaler."""

    def __init__(self, redis: Redis, ledger: Ledger) -> None:
        self.redis = redis
        self.ledger = ledger
        self._transition = redis.register_script(_TRANSITION)
        self._republish = redis.register_script(_REPUBLISH)

    def republish(self, job_id: str) -> bool:
        """Send a still-queued job a new message (its own was lost); False if it left the queue."""
        message = generate_message(job_id, self.ledger.queue)
        return bool(self._republish([keys.job(job_id), self.ledger.queue], [message]))

    def get(self, job_id: str) -> JobRecord | None:
        """One job's record."""
        return decode(job_id, self.redis.hgetall(keys.job(job_id)))  # type: ignore[arg-type]

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        """Several records in one round trip."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [decode(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True)]

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect_attempt: int | None = None,
        score: float | None = None,
        lease_ended_by: float | None = None,
        **fields: Any,
    ) -> None:
        """Move a job to `to` if the table allows it and `expect_attempt` still holds it.

        `lease_ended_by` is the reaper's guard: refuse if the running lease was renewed past it.
        """
        keys_, args = self.ledger.transition_call(
            job_id,
            to,
            attempt=expect_attempt,
            fields=encode(**fields),
            score=score,
            lease_ended_by=lease_ended_by,
        )
        check_transition(self._transition(keys_, args), job_id, to)

    def try_transition(self, job_id: str, to: JobStatus, **kwargs: Any) -> bool:
        """Like transition, answering False instead of raising when the change is refused."""
        try:
            self.transition(job_id, to, **kwargs)
        except IllegalTransition:
            return False
        return True

    def try_transitions(self, changes: Sequence[Change]) -> list[bool]:
        """Several changes in one round trip (each its own compare-and-set); which were applied."""
        if not changes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for change in changes:
            keys_, args = self.ledger.transition_call(
                change.job_id,
                change.to,
                attempt=change.expect_attempt,
                fields=encode(**change.fields),
                score=change.score,
            )
            self._transition(keys_, args, client=pipe)
        return [_text(result[0]) == "ok" for result in pipe.execute()]

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """The current status of each job, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [JobStatus(s) if s else None for s in pipe.execute()]


class AsyncJobStore:
    """Asynchronous ledger access for the gateway."""

    def __init__(self, redis: AsyncRedis, ledger: Ledger) -> None:
        self.redis = redis
        self.ledger = ledger
        self._submit = ScriptBatcher(redis, _SUBMIT)
        self._transition = redis.register_script(_TRANSITION)

    async def submit(
        self, record: JobRecord, idempotency: tuple[str, str] | None = None
    ) -> tuple[str, str]:
        """Record and enqueue atomically: (created, id), (duplicate, stored value) or (full, '')."""
        keys_, args = self.ledger.submit_call(record, idempotency)
        outcome, value = await self._submit(keys_, args)
        return _text(outcome), _text(value)

    async def get(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        """A record and its 0-based queue rank (None unless queued), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.zrank(keys.QUEUED, job_id)
        raw, rank = await pipe.execute()
        return decode(job_id, raw), rank

    async def transition(self, job_id: str, to: JobStatus, **fields: Any) -> None:
        """Move a job to `to` if the table allows it (client-initiated changes carry no attempt)."""
        keys_, args = self.ledger.transition_call(
            job_id, to, attempt=None, fields=encode(**fields), score=None
        )
        check_transition(await self._transition(keys_, args), job_id, to)

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

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Several records in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [decode(i, raw) for i, raw in zip(job_ids, await pipe.execute(), strict=True)]

    async def forget(self, tenant: str, job_ids: Sequence[str]) -> None:
        """Drop expired jobs from a tenant's index."""
        if job_ids:
            await self.redis.zrem(keys.tenant_jobs(tenant), *job_ids)

    async def counts(self) -> tuple[int, int]:
        """(queued, running) job counts."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(keys.QUEUED)
        pipe.zcard(keys.RUNNING)
        queued, running = await pipe.execute()
        return int(queued), int(running)
