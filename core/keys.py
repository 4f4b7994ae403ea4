"""Every Redis key the service uses, in one place (core/lua builds the same names).

The ledger owns the queue. A queued job waits in its tenant's *line* (`ready`) for its model and
priority class; dispatch moves it into the model's *window* (`dispatched`, its Celery message in
the broker list) and a worker's claim moves it to `running`. kombu's own key names live in
core/broker.py, the one module that knows them.
"""

from __future__ import annotations

PREFIX = "dq"

RUNNING = f"{PREFIX}:running"  # zset job_id -> lease deadline: the recovery sweep's work list
WORKERS = f"{PREFIX}:workers"  # zset worker name -> last heartbeat time
STATS = f"{PREFIX}:stats"  # hash: queued (jobs waiting or dispatched), per-model unit sums
MODELS = f"{PREFIX}:models"  # set of the model names jobs were ever queued for
PAUSED = f"{PREFIX}:paused"  # hash model ('*': all) -> when an admin paused its dispatch
SEQ = f"{PREFIX}:seq"  # counter: each dispatch's message tag
EXPIRING = f"{PREFIX}:expiring"  # zset job_id -> when its record and images expire
UPLOADS = f"{PREFIX}:uploads"  # zset "<tenant> <upload id>" -> when an unused upload expires
DEADLINES = f"{PREFIX}:deadlines"  # zset job_id -> when a job not yet started must fail
SCALER_LOCK = f"{PREFIX}:scaler:lock"  # one scaler at a time
SWEEP_LOCK = f"{PREFIX}:sweep:lock"  # one recovery sweep at a time, whoever runs it
SCALER_POOLS = f"{PREFIX}:scaler:pools"  # hash model -> its pool's last decision (JSON)
WEBHOOK_RETRIES = f"{PREFIX}:webhooks:retries"  # zset delivery order JSON -> when it is due
CHANGES = f"{PREFIX}:changes"  # pub/sub channel: "<job id> <status>" after every ledger write
KEY_CHANGES = f"{PREFIX}:keys:changes"  # pub/sub channel: API keys or tenant limits changed
API_KEYS = f"{PREFIX}:apikeys"  # hash sha256(key) -> the key's record (tenant, role, id)
KEYS_MANAGED = f"{PREFIX}:apikeys:managed"  # set once a key is made: the API is never open again
METRICS = f"{PREFIX}:metrics"  # hash: counters written once per event, read at scrape time

CLASSES = ("high", "normal", "low")  # priority classes, in the order dispatch serves them


def job(job_id: str) -> str:
    """The hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def webhook_log(job_id: str) -> str:
    """The list of a job's webhook delivery attempts, oldest first."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def tenant_jobs(tenant: str) -> str:
    """The zset of a tenant's job ids by creation time."""
    return f"{PREFIX}:tenant:{tenant}:jobs"


def tenant(tenant_: str) -> str:
    """The hash of a tenant's settings (weight, limits) from the key store."""
    return f"{PREFIX}:tenant:{tenant_}"


def usage(tenant_: str) -> str:
    """The hash counting a tenant's jobs: queued, inflight (dispatched or running)."""
    return f"{PREFIX}:usage:{tenant_}"


def idempotency(tenant_: str, key: str) -> str:
    """The string remembering which job an Idempotency-Key created."""
    return f"{PREFIX}:idem:{tenant_}:{key}"


def worker(name: str) -> str:
    """The string holding a worker's latest heartbeat."""
    return f"{PREFIX}:worker:{name}"


def ready(model: str, klass: str, tenant_: str) -> str:
    """A tenant's line of waiting jobs for one model and class (zset job -> order)."""
    return f"{PREFIX}:ready:{model}:{klass}:{tenant_}"


def lines(model: str, klass: str) -> str:
    """The tenants with waiting jobs for one model and class (zset tenant -> virtual start)."""
    return f"{PREFIX}:lines:{model}:{klass}"


def waiting(model: str, klass: str) -> str:
    """Every waiting job of one model and class (zset job -> created): depth and oldest wait."""
    return f"{PREFIX}:waiting:{model}:{klass}"


def queued_units(model: str, klass: str) -> str:
    """Work units waiting per tenant for one model and class (hash tenant -> units; '*': all)."""
    return f"{PREFIX}:units:{model}:{klass}"


def dispatched(model: str) -> str:
    """The model's dispatch window: jobs whose message is out, not yet claimed (zset -> when)."""
    return f"{PREFIX}:dispatched:{model}"


def pool(model: str) -> str:
    """The workers serving one model (zset worker name -> last heartbeat)."""
    return f"{PREFIX}:pool:{model}"


def model(name: str) -> str:
    """The hash a model's workers publish: how many messages each prefetches."""
    return f"{PREFIX}:model:{name}"


def gcra(tenant_: str, what: str) -> str:
    """A tenant's rate limiter state (the theoretical arrival time) for `what` (submit, read)."""
    return f"{PREFIX}:gcra:{what}:{tenant_}"


def quota(tenant_: str) -> str:
    """A tenant's work units per fixed quota window (hash: window number from the epoch)."""
    return f"{PREFIX}:quota:{tenant_}"
