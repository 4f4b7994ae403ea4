"""The one module that knows how Celery and kombu keep messages in Redis.

The ledger writes Celery messages straight into broker lists (Celery task protocol 2, as kombu's
Redis transport stores it): the dispatch script renders a job's message from a template, and the
transition script pushes webhook delivery orders. Recovery asks here which jobs the broker lists
still name, and clears kombu's record of messages that a dead worker had received (the ledger
dispatches those jobs again). Nothing else touches kombu's key names.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Sequence
from typing import NamedTuple

from pydantic import BaseModel, Field
from redis import Redis

from core.events import DeliveryOrder

GENERATE_TASK = "dq.generate"
DELIVER_TASK = "dq.deliver_webhook"

# What the dispatch script replaces in the template (plain text: no Lua pattern characters).
JOB, TAG, QUEUE = "@JOB@", "@TAG@", "@QUEUE@"

UNACKED = "unacked"  # kombu's hash: delivery tag -> [message, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # kombu's zset: delivery tag -> delivery time
PRIORITY_SEP = "\x06\x16"  # kombu's separator for a queue's priority sub-lists
PRIORITY_STEPS = (3, 6, 9)  # kombu's default sub-lists besides the base list

JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # as messages name their job (in the body, in clear)


def job_queue(base: str, model: str) -> str:
    """The Celery queue of one model's jobs."""
    return f"{base}.{model}"


class DeliveryInfo(BaseModel):
    """Where kombu routes the message."""

    exchange: str = ""
    routing_key: str


class Properties(BaseModel):
    """kombu's message properties (no body encoding: the body is the JSON text itself)."""

    correlation_id: str
    reply_to: str = ""
    delivery_mode: int = 2
    delivery_info: DeliveryInfo
    priority: int = 0
    delivery_tag: str = Field(default_factory=lambda: str(uuid.uuid4()))


class TaskMessage(BaseModel):
    """A Celery protocol-2 task message in kombu's Redis envelope."""

    body: str
    content_encoding: str = Field(default="utf-8", serialization_alias="content-encoding")
    content_type: str = Field(default="application/json", serialization_alias="content-type")
    headers: dict[str, object]
    properties: Properties


def task_message(
    task: str, args: list[object], queue: str, task_id: str | None = None, tag: str | None = None
) -> str:
    """The serialized protocol-2 message calling `task(*args)` on `queue`."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None}])
    headers: dict[str, object] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": "dq",
        "ignore_result": True,
    }
    properties = Properties(correlation_id=task_id, delivery_info=DeliveryInfo(routing_key=queue))
    if tag is not None:
        properties.delivery_tag = tag
    message = TaskMessage(body=body, headers=headers, properties=properties)
    return message.model_dump_json(by_alias=True)


def generate_template() -> str:
    """The message asking a worker to run a job, with @JOB@, @TAG@ and @QUEUE@ to fill in."""
    return task_message(GENERATE_TASK, [JOB], QUEUE, task_id=TAG, tag=TAG)


def generate_message(job_id: str, queue: str, tag: str | None = None) -> str:
    """The message asking a worker to run `job_id` (the dispatch script renders the same)."""
    tag = tag or str(uuid.uuid4())
    return generate_template().replace(JOB, job_id).replace(TAG, tag).replace(QUEUE, queue)


def delivery_message(order: DeliveryOrder, queue: str) -> str:
    """The serialized message asking the webhook sender to make one delivery attempt."""
    return task_message(DELIVER_TASK, [order.model_dump(mode="json")], queue)


def lists(queue: str) -> list[str]:
    """Every Redis list a Celery queue's messages may sit in (base plus priority sub-lists)."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)]


def waiting(redis: Redis, queues: Collection[str]) -> int:
    """Messages sitting in these queues' lists, not yet taken by any worker."""
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for name in lists(queue):
            pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


def named_in_lists(redis: Redis, queues: Collection[str]) -> set[str]:
    """The job ids that messages waiting in these queues' lists name (the dispatch window)."""
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for name in lists(queue):
            pipe.lrange(name, 0, -1)
    found: set[str] = set()
    for messages in pipe.execute():
        for raw in messages:
            found.update(JOB_ID.findall(str(raw)))
    return found


class Dropped(NamedTuple):
    """What `forget_received` dropped: how many records, and the jobs their messages named."""

    messages: int
    jobs: frozenset[str]


def forget_received(
    redis: Redis, queues: Collection[str], held: Collection[str], older_than: float
) -> Dropped:
    """Drop kombu's record of job messages received before `older_than` that nobody holds.

    A worker that dies leaves the messages it had received in kombu's `unacked` hash, where
    Celery would put them back on the queue after its visibility timeout: a second copy of a job
    the ledger dispatches again (the jobs named are returned for that). Only job queues' messages
    are touched, never another queue's (the webhook sender's).
    """
    tags = [str(t) for t in redis.zrangebyscore(UNACKED_INDEX, "-inf", older_than)]
    stale = [t for t in tags if t not in held]
    if not stale:
        return Dropped(0, frozenset())
    routes = redis.hmget(UNACKED, stale)
    dropped, jobs = 0, set()
    for tag, raw in zip(stale, routes, strict=True):
        if (raw is None or _routing_key(str(raw)) in queues) and _drop(redis, tag):
            dropped += 1
            jobs.update(JOB_ID.findall(str(raw or "")))
    return Dropped(dropped, frozenset(jobs))


def _routing_key(raw: str) -> str | None:
    try:
        _message, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return str(routing_key)


def _drop(redis: Redis, tag: str) -> int:
    pipe = redis.pipeline(transaction=True)
    pipe.hdel(UNACKED, tag)
    pipe.zrem(UNACKED_INDEX, tag)
    removed, _ = pipe.execute()
    return int(removed)


def queues_of(base: str, models: Sequence[str]) -> list[str]:
    """The job queues of these models."""
    return [job_queue(base, m) for m in models]
