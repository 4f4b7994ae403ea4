"""Every Redis key the service uses, in one place."""

from __future__ import annotations

PREFIX = "dq"

QUEUED = f"{PREFIX}:queued"  # zset job_id -> enqueue time: queue positions
RUNNING = f"{PREFIX}:running"  # zset job_id -> lease deadline: the reaper's work list
WORKERS = f"{PREFIX}:workers"  # zset worker name -> last heartbeat time
SCALER_LOCK = f"{PREFIX}:scaler:lock"  # one scaler (and reaper) at a time
SCALER_STATUS = f"{PREFIX}:scaler:status"  # the last decision: current, desired, reason
WEBHOOK_RETRIES = f"{PREFIX}:webhooks:retries"  # zset delivery order JSON -> when it is due
CHANGES = f"{PREFIX}:changes"  # pub/sub channel: "<job id> <status>" after every ledger write
UNACKED = "unacked"  # kombu's hash: delivery tag -> [message, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # kombu's zset: delivery tag -> delivery time
PRIORITY_SEP = "\x06\x16"  # kombu's separator for a queue's priority sub-lists
PRIORITY_STEPS = (3, 6, 9)  # kombu's default sub-lists besides the base list


def job(job_id: str) -> str:
    """The hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def webhook_log(job_id: str) -> str:
    """The list of a job's webhook delivery attempts, oldest first."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def tenant_jobs(tenant: str) -> str:
    """The zset of a tenant's job ids by creation time."""
    return f"{PREFIX}:tenant:{tenant}:jobs"


def idempotency(tenant: str, key: str) -> str:
    """The string remembering which job an Idempotency-Key created."""
    return f"{PREFIX}:idem:{tenant}:{key}"


def worker(name: str) -> str:
    """The hash a worker's heartbeat writes."""
    return f"{PREFIX}:worker:{name}"


def broker_lists(queue: str) -> list[str]:
    """Every Redis list a Celery queue's messages may sit in (base plus priority sub-lists)."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)]
