"""The gateway's /metrics: the ledger's metrics read from Redis at scrape time, and its own HTTP
requests (api/traffic.py).

The ledger's (jobs, queue, workers, webhooks, reaper, scaler) are counted once per event in
Redis by whichever process the event happens in (core/metrics.py), workers and the webhook
sender included, so every gateway replica exports the same values: take `max` across replicas.
HTTP requests are counted per gateway (all its processes together): `sum` across replicas.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client import generate_latest as render
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.traffic import Instruments, http_registry
from core import heartbeats, keys, metrics
from core.heartbeats import ScalerStatus, WorkerBeat, WorkerState
from core.settings import Settings
from core.tracing import Tracing

log = logging.getLogger(__name__)

BEAT_SHOWN_S = 300.0  # a silent worker's heartbeat age is shown this long, then it is dropped
REAPER_ACTIONS = ("requeued", "failed", "redispatched")  # a deadline is the client's, not these
MAX_DISPATCHED = 1000  # a window holds what the live workers prefetch: far fewer


@dataclass
class Snapshot:
    """What one scrape read from Redis."""

    now: float
    counts: dict[str, str] = field(default_factory=dict)  # keys.METRICS
    stats: dict[str, str] = field(default_factory=dict)  # keys.STATS
    models: list[str] = field(default_factory=list)
    queued: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, class) -> jobs
    oldest: dict[tuple[str, str], float] = field(default_factory=dict)  # -> created, if any
    waiting_units: dict[tuple[str, str], float] = field(default_factory=dict)
    beats: list[WorkerBeat] = field(default_factory=list)  # seen within BEAT_SHOWN_S
    pools: dict[str, ScalerStatus] = field(default_factory=dict)  # each pool's last decision


async def read_snapshot(redis: Redis, now: float) -> Snapshot:
    """Everything the ledger's metrics need, in two round trips (plus the heartbeats')."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.METRICS)
    pipe.hgetall(keys.STATS)
    pipe.smembers(keys.MODELS)
    pipe.hgetall(keys.SCALER_POOLS)
    pipe.zrangebyscore(keys.WORKERS, now - BEAT_SHOWN_S, "+inf")
    counts, stats, models, scaler, names = await pipe.execute()
    snap = Snapshot(now, _texts(counts), _texts(stats), sorted(_text(m) for m in models))
    snap.pools = heartbeats.statuses_of(scaler)
    pipe = redis.pipeline(transaction=False)
    places = [(m, c) for m in snap.models for c in keys.CLASSES]
    for m, c in places:
        pipe.zcard(keys.waiting(m, c))
        pipe.zrange(keys.waiting(m, c), 0, 0, withscores=True)
        pipe.hget(keys.queued_units(m, c), "*")
    for m in snap.models:
        pipe.zrange(keys.dispatched(m), 0, MAX_DISPATCHED - 1)
    pipe.mget([keys.worker(_text(n)) for n in names] or ["-"])
    replies = await pipe.execute()
    for i, place in enumerate(places):
        depth, first, units = replies[3 * i : 3 * i + 3]
        snap.queued[place] = int(depth)
        snap.waiting_units[place] = float(units or 0)
        if first:
            snap.oldest[place] = float(first[0][1])
    snap.beats = [WorkerBeat.model_validate_json(r) for r in replies[-1] if r]
    sent = dict(zip(snap.models, replies[3 * len(places) : -1], strict=True))
    await _count_dispatched(redis, snap, sent)
    return snap


async def _count_dispatched(redis: Redis, snap: Snapshot, sent: Mapping[str, list[Any]]) -> None:
    """Add the jobs in each model's dispatch window (queued, their message out) to their class."""
    pipe = redis.pipeline(transaction=False)
    order = [(m, _text(job)) for m, jobs in sent.items() for job in jobs]
    for _, job in order:
        pipe.hget(keys.job(job), "priority")
    for (m, _), klass in zip(order, await pipe.execute() if order else [], strict=True):
        place = (m, _text(klass) if klass else "normal")
        snap.queued[place] = snap.queued.get(place, 0) + 1


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class Ledger:
    """The metric families of one snapshot (or their empty selves, when Redis is away)."""

    def __init__(self, settings: Settings, snap: Snapshot | None) -> None:
        self.settings, self.up = settings, snap is not None
        self.snap = snap or Snapshot(time.time())
        self.counts = self.snap.counts
        self.live_s = settings.heartbeat_s * 3

    def collect(self) -> Iterator[Metric]:
        """Every family of the ledger's metrics."""
        up = GaugeMetricFamily("dq_redis_up", "1 when this gateway could read Redis at scrape")
        up.add_metric([], int(self.up))
        yield up
        yield from self.jobs()
        yield from self.queue()
        yield from self.workers()
        yield from self.events()

    def fields(self, prefix: str, parts: int) -> Iterator[tuple[list[str], float]]:
        """The counters named `<prefix>:a:b...` (`parts` labels), with their values."""
        for name, value in self.counts.items():
            head, _, rest = name.partition(":")
            if head == prefix:
                labels = rest.split(":")
                if len(labels) == parts:
                    yield labels, float(value)

    def histogram(self, name: str, key: str, doc: str) -> HistogramMetricFamily:
        """A histogram of `h:<key>:<model>:<le>` counts and `hs:<key>:<model>` sums."""
        bounds = metrics.BOUNDS[key]
        found: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (k, model, le), n in self.fields("h", 3):
            if k == key:
                found[model].append((float(le), n))
        family = HistogramMetricFamily(name, doc, labels=["model"])
        for model, buckets in sorted(found.items()):
            cumulative = [(metrics.le(b), sum(n for at, n in buckets if at <= b)) for b in bounds]
            total = sum(n for _, n in buckets)
            observed = float(self.counts.get(f"hs:{key}:{model}", 0))
            family.add_metric([model], [*cumulative, (metrics.INF, total)], observed)
        return family

    def jobs(self) -> Iterator[Metric]:
        """Jobs ended, their times, work served."""
        finished = CounterMetricFamily(
            "dq_jobs_finished",
            "Jobs that ended, by model, status and error code ('' unless failed)",
            labels=["model", "status", "code"],
        )
        for (model, status, code), n in sorted(self.fields("finished", 3)):
            finished.add_metric([model, status, code], n)
        yield finished
        for key, what in [
            ("queue", "Submit to the start of the attempt that ended it, jobs that started"),
            ("run", "Start to end of the last attempt, jobs that started"),
            ("e2e", "Submit to images stored, succeeded jobs"),
            ("storage", "Pipeline call's return to images stored, succeeded jobs"),
        ]:
            yield self.histogram(f"dq_job_{key}_seconds", key, what + " (seconds)")
        served = CounterMetricFamily(
            "dq_tenant_units_served",
            f"Work units of succeeded jobs by tenant (the first {metrics.MAX_TENANTS} tenants"
            f" served; the others as {metrics.OTHER_TENANT})",
            labels=["tenant"],
        )
        for (tenant,), units in sorted(self.fields("served", 1)):
            served.add_metric([tenant], units)
        yield served

    def queue(self) -> Iterator[Metric]:
        """The queue's gauges and dispatches."""
        snap, stats = self.snap, self.snap.stats
        queued = GaugeMetricFamily(
            "dq_jobs_queued",
            "Jobs queued: waiting in the tenants' lines or handed to the broker, not yet started",
            labels=["model", "priority"],
        )
        oldest = GaugeMetricFamily(
            "dq_queue_oldest_wait_seconds",
            "How long the oldest waiting job has waited (0: none waits)",
            labels=["model", "priority"],
        )
        running = GaugeMetricFamily("dq_jobs_running", "Jobs running", labels=["model"])
        backlog = GaugeMetricFamily(
            "dq_backlog_units",
            "Work units waiting, dispatched and running (1 = a guided 512², 25-step image)",
            labels=["model"],
        )
        for model in snap.models:
            units = 0.0
            for c in keys.CLASSES:
                queued.add_metric([model, c], snap.queued.get((model, c), 0))
                at = snap.oldest.get((model, c))
                oldest.add_metric([model, c], 0.0 if at is None else max(0.0, snap.now - at))
                units += snap.waiting_units.get((model, c), 0.0)
            running.add_metric([model], float(stats.get(f"rjobs:{model}", 0)))
            flight = float(stats.get(f"dunits:{model}", 0)) + float(stats.get(f"runits:{model}", 0))
            backlog.add_metric([model], max(0.0, units + flight))
        yield from (queued, oldest, running, backlog)
        target = GaugeMetricFamily(
            "dq_queue_target_wait_seconds", "The wait the scaler aims for (DQ_SCALER_TARGET_WAIT_S)"
        )
        target.add_metric([], self.settings.scaler_target_wait_s)
        yield target
        dispatches = CounterMetricFamily(
            "dq_dispatches", "Jobs handed to the broker", labels=["model", "priority"]
        )
        for labels, n in sorted(self.fields("dispatches", 2)):
            dispatches.add_metric(labels, n)
        yield dispatches
        limited = CounterMetricFamily(
            "dq_limit_rejections", "Submits refused by a tenant limit (429)", labels=["limit"]
        )
        for labels, n in sorted(self.fields("limited", 1)):
            limited.add_metric(labels, n)
        yield limited

    def workers(self) -> Iterator[Metric]:
        """Each worker's heartbeat, the pools, batches, the scaler."""
        snap = self.snap
        rate = GaugeMetricFamily(
            "dq_worker_images_per_second",
            "Images per second a live worker measured",
            labels=["worker", "model"],
        )
        state = GaugeMetricFamily(
            "dq_worker_state",
            "1 for a live worker's current state",
            labels=["worker", "model", "state"],
        )
        age = GaugeMetricFamily(
            "dq_worker_heartbeat_age_seconds",
            f"Seconds since a worker's last heartbeat (shown {BEAT_SHOWN_S:g} s after it stops)",
            labels=["worker", "model"],
        )
        pools: dict[str, dict[str, int]] = {m: {} for m in snap.models}
        for beat in snap.beats:
            age.add_metric([beat.name, beat.model], max(0.0, snap.now - beat.at))
            if not self._live(beat):
                continue
            rate.add_metric([beat.name, beat.model], beat.images_per_s or 0.0)
            for s in WorkerState:
                state.add_metric([beat.name, beat.model, s.value], int(beat.state is s))
            pool = pools.setdefault(beat.model, {})
            pool[beat.state.value] = pool.get(beat.state.value, 0) + 1
        workers = GaugeMetricFamily(
            "dq_workers", "Live workers by model and state", labels=["model", "state"]
        )
        for model, pool in sorted(pools.items()):
            for s in WorkerState:
                workers.add_metric([model, s.value], pool.get(s.value, 0))
        yield from (rate, state, age, workers)
        yield self.histogram("dq_batch_size", "batch_size", "Rows per pipeline call")
        yield self.histogram(
            "dq_batch_fill_ratio", "batch_fill", "Rows per pipeline call over the most it takes"
        )
        yield self.histogram(
            "dq_step_rows", "step_rows", "Denoiser rows per call of the step engine's loop"
        )
        yield from scaler_families(snap.pools)

    def _live(self, beat: WorkerBeat) -> bool:
        now = self.snap.now
        return now - beat.at <= self.live_s and beat.loop_fresh(now, self.settings.loop_stale_s)

    def events(self) -> Iterator[Metric]:
        """Webhook deliveries and the reaper."""
        deliveries = CounterMetricFamily(
            "dq_webhook_deliveries",
            "Webhook attempts logged, by outcome and attempt number (1-5, 6+)",
            labels=["outcome", "attempt"],
        )
        for labels, n in sorted(self.fields("webhook", 2)):
            deliveries.add_metric(labels, n)
        yield deliveries
        reaper = CounterMetricFamily(
            "dq_reaper_actions",
            "Jobs the recovery sweep handed back (requeued), dispatched again or failed",
            labels=["action"],
        )
        for (action,), n in sorted(self.fields("reaper", 1)):
            if action in REAPER_ACTIONS:
                reaper.add_metric([action], n)
        yield reaper


def scaler_families(pools: Mapping[str, ScalerStatus]) -> Iterable[Metric]:
    """Each pool's last decision; no samples while no scaler decides (a stale count misleads)."""
    current = GaugeMetricFamily(
        "dq_scaler_workers_current",
        "Workers running or starting, as the scaler last counted them",
        labels=["model"],
    )
    desired = GaugeMetricFamily(
        "dq_scaler_workers_desired", "Workers the scaler last decided on", labels=["model"]
    )
    for model, status in sorted(pools.items()):
        current.add_metric([model], status.current)
        desired.add_metric([model], status.desired)
    return (current, desired)


@dataclass
class Families:
    """What one scrape renders: anything with `collect()`."""

    parts: list[Any]

    def collect(self) -> Iterator[Metric]:
        """Every part's families."""
        for part in self.parts:
            yield from part.collect()


def instrument(app: FastAPI, settings: Settings, tracing: Tracing) -> None:
    """Count the app's requests and serve /metrics."""
    http, http_collector = http_registry(CollectorRegistry(auto_describe=True))
    app.add_middleware(Instruments, http=http, tracing=tracing)

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        redis: Redis = app.state.resources.redis
        try:
            snap: Snapshot | None = await read_snapshot(redis, time.time())
        except (RedisError, OSError) as e:
            log.warning("metrics: Redis unavailable (%.200s)", e)
            snap = None
        families = Families([Ledger(settings, snap), http_collector])
        return Response(render(families), media_type=CONTENT_TYPE_LATEST)  # type: ignore[arg-type]
