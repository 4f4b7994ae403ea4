"""The metrics across real processes: two gateway processes, a worker and a webhook sender after
a mixed run (succeeded, failed by the worker and by a deadline, canceled, requeued by the
reaper, refused by a limit, a webhook retried); every counter and histogram the gateway exports
must match the jobs' own records, whichever gateway process answers the scrape."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from core import keys, metrics
from core.embedded import free_port
from core.jobs import JobStatus
from core.records import JobRecord
from core.recovery import Recovery, RecoveryConfig
from core.signing import new_secret
from core.store import Change, JobStore, Ledger
from tests.conftest import (
    ALICE_KEY,
    BOB_KEY,
    ROOT,
    WorkerProcess,
    settings_from,
    wait_for,
    wait_until,
)
from tests.test_store import claim, record, store_with
from tests.webhook_parts import Answer, Receiver, SenderProcess, wait_deliveries

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"<html>not an image</html>").decode()


@dataclass
class GatewayProcess:
    """`python -m api --workers 2`: two processes on one port (SO_REUSEPORT)."""

    process: subprocess.Popen[bytes]
    url: str

    def client(self, key: str) -> httpx.Client:
        """A client that opens a new connection per request, so both processes serve it."""
        limits = httpx.Limits(max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, limits=limits)


@pytest.fixture
def run_env(env: dict[str, str]) -> dict[str, str]:
    """Webhooks on (retries compressed), four queued jobs a tenant at most."""
    env.update(
        {
            "DQ_WEBHOOK_SECRET": new_secret(),
            "DQ_WEBHOOK_ALLOW_PRIVATE": "1",
            "DQ_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2",
            "DQ_TENANT_MAX_QUEUED": "4",
            "DQ_MAX_ATTEMPTS": "2",
            "DQ_MAX_BATCH_SIZE": "4",
            "DQ_BATCH_TIMEOUT_S": "0.3",
        }
    )
    return env


@pytest.fixture
def gateway_process(run_env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcess]:
    """Two gateway processes sharing their HTTP counts."""
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **run_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the gateway")
        yield GatewayProcess(process, url)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


# --- what the exposition says --------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[Sample]]:
    """Every sample of /metrics by family name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def values(samples: list[Sample], suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one kind (`_total`, `_bucket`, `_sum`, ...) by their sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in samples
        if s.name.endswith(suffix) and not s.name.endswith("_created")
    }


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    """The label key of a sample."""
    return tuple(sorted(labels.items()))


# --- what the jobs' own records say --------------------------------------------------------------


def expected_histogram(
    name: str, model: str, observations: list[float]
) -> dict[tuple[tuple[str, str], ...], float]:
    """The buckets a histogram of `observations` has (cumulative, with +Inf)."""
    bounds = metrics.BOUNDS[name]
    out = {
        key(model=model, le=metrics.le(b)): float(sum(1 for v in observations if v <= b))
        for b in bounds
    }
    out[key(model=model, le="+Inf")] = float(len(observations))
    return out


def job_times(records: list[JobRecord]) -> dict[str, list[float]]:
    """Each job-time histogram's observations, from the records alone."""
    times: dict[str, list[float]] = {"queue": [], "run": [], "e2e": [], "storage": []}
    for r in records:
        assert r.finished_at is not None, r.id
        if r.started_at is not None:
            times["queue"].append(max(0.0, r.started_at - r.created_at))
            times["run"].append(max(0.0, r.finished_at - r.started_at))
        if r.status is JobStatus.SUCCEEDED:
            times["e2e"].append(r.finished_at - r.created_at)
            assert r.metrics.model_done_at is not None
            times["storage"].append(max(0.0, r.finished_at - r.metrics.model_done_at))
    return times


def assert_histogram(
    samples: list[Sample], name: str, model: str, observed: list[float], bounds_key: str
) -> None:
    """The exported histogram holds exactly these observations."""
    assert values(samples, "_bucket") == expected_histogram(bounds_key, model, observed), name
    assert values(samples, "_count") == {key(model=model): float(len(observed))}, name
    (total,) = values(samples, "_sum").values()
    assert total == pytest.approx(sum(observed), abs=1e-6), name


# --- the run -------------------------------------------------------------------------------------


def submit(client: httpx.Client, **fields: Any) -> str:
    """A 202'd job's id."""
    resp = client.post("/v1/jobs", json={**SMALL, **fields})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


@dataclass
class Run:
    """What the run did, as the test's side saw it."""

    jobs: list[str]
    canceled: int
    rejected: int
    reaped: dict[str, float]  # the recovery sweep's actions


def mixed_run(
    gw: GatewayProcess,
    rclient: redis.Redis,
    run_env: dict[str, str],
    start_processes: Callable[[], None],
    hook_url: str,
) -> Run:
    """Jobs of every outcome; the worker and the sender start halfway."""
    settings = settings_from(run_env)
    store = JobStore(rclient, Ledger.of(settings))
    alice, bob = gw.client(ALICE_KEY), gw.client(BOB_KEY)

    # Before any worker: bob fills his queue (DQ_TENANT_MAX_QUEUED), one more is refused; he
    # cancels them all.
    bobs = [submit(bob) for _ in range(4)]
    refused = bob.post("/v1/jobs", json=SMALL)
    assert refused.status_code == 429, refused.text
    for job_id in bobs:
        assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 200

    # Two jobs whose worker "dies": a ghost claims them with leases already over. A sweep hands
    # both back; the ghost claims one again and it fails for good (DQ_MAX_ATTEMPTS=2).
    orphan, poison = submit(alice), submit(alice)
    ghost_claims(store, [orphan, poison])
    first = Recovery(rclient, store, RecoveryConfig.of(settings)).sweep()
    ghost_claims(store, [poison])
    second = Recovery(rclient, store, RecoveryConfig.of(settings)).sweep()
    assert (first.requeued, first.failed, second.requeued, second.failed) == (2, 0, 0, 1)

    start_processes()
    hooked = {"url": hook_url, "events": ["job.succeeded", "job.failed"]}
    # Two waves, the second submitted once the first has ended: with the orphan, at most
    # DQ_TENANT_MAX_QUEUED of alice's wait at a time.
    waves: list[Callable[[], list[tuple[httpx.Client, str]]]] = [
        lambda: [(alice, submit(alice, webhook=hooked, num_images=n)) for n in (1, 2, 1)],
        lambda: [
            (alice, submit(alice, webhook=hooked, num_images=3)),
            (alice, submit(alice, task="img2img", image=NOT_AN_IMAGE, webhook=hooked)),
            *[(bob, submit(bob)) for _ in range(2)],
        ],
    ]
    submitted = []
    for wave in waves:
        submitted.append(wave())
        for client, job_id in submitted[-1]:
            wait_for(client, job_id, timeout=120)
    wait_for(alice, orphan, timeout=120)
    jobs = [*bobs, orphan, poison, *(job_id for wave in submitted for _, job_id in wave)]
    return Run(jobs, canceled=len(bobs), rejected=1, reaped={"requeued": 2.0, "failed": 1.0})


def ghost_claims(store: JobStore, job_ids: list[str]) -> None:
    """Claim dispatched jobs for a worker that is gone at once (its leases already over)."""
    for job_id in job_ids:
        wait_until(lambda j=job_id: store.get(j).dispatched_at, 10, "a dispatch")  # type: ignore[misc,union-attr]
        now = time.time()
        claim = Change("claim", job_id, worker="ghost", lease=now - 1, fields={"started_at": now})
        assert store.change(claim).ok


def test_every_metric_matches_the_jobs_own_records(
    gateway_process: GatewayProcess,
    run_env: dict[str, str],
    rclient: redis.Redis,
    tmp_path: Path,
) -> None:
    receiver = Receiver([Answer(500), Answer(200)]).start()  # the first delivery is retried
    started: list[Any] = []

    def start_processes() -> None:
        started.append(SenderProcess(run_env, tmp_path / "sender.log"))
        worker = WorkerProcess(run_env, tmp_path / "worker.log", "w-metrics@test")
        started.append(worker)
        worker.wait_ready(rclient)

    try:
        run = mixed_run(gateway_process, rclient, run_env, start_processes, receiver.url)
        check_metrics(gateway_process, run_env, rclient, run)
    finally:
        receiver.stop()
        for proc in started:
            proc.stop()


def check_metrics(
    gw: GatewayProcess, run_env: dict[str, str], rclient: redis.Redis, run: Run
) -> None:
    """Every family against the records, on several scrapes (either gateway process answers)."""
    settings = settings_from(run_env)
    store = JobStore(rclient, Ledger.of(settings))
    records = [store.get(j) for j in run.jobs]
    assert all(r is not None for r in records)
    done: list[JobRecord] = [r for r in records if r is not None]
    hooked = [r for r in done if r.webhook is not None]
    with gw.client(ALICE_KEY) as alice:
        logs = [
            wait_deliveries(alice, r.id, lambda log: any(e["outcome"] == "delivered" for e in log))
            for r in hooked
        ]
    wait_until(lambda: idle_worker(scrape(gw.url)), 20, "an idle worker")
    for _ in range(4):  # new connections: both processes answer some of these scrapes
        exported = scrape(gw.url)
        check_jobs(exported, done)
        check_events(exported, done, logs, run)
        check_gauges(exported, settings.scaler_target_wait_s)
        check_http(exported, run)


def idle_worker(exported: dict[str, list[Sample]]) -> bool:
    """Whether the one worker is live and idle."""
    return values(exported["dq_workers"]).get(key(model="tiny", state="idle")) == 1.0


def check_jobs(exported: dict[str, list[Sample]], done: list[JobRecord]) -> None:
    """Outcomes, times, work served, batches."""
    outcomes = Counter((r.model, r.status.value, r.error.code if r.error else "") for r in done)
    assert values(exported["dq_jobs_finished"], "_total") == {
        key(model=m, status=s, code=c): float(n) for (m, s, c), n in outcomes.items()
    }
    assert {c for _, s, c in outcomes if s == "failed"} == {"max_attempts", "input_not_image"}
    for name, observed in job_times(done).items():
        family = f"dq_job_{name}_seconds"
        assert_histogram(exported[family], family, "tiny", observed, name)
    served: dict[str, float] = {}
    for r in done:
        if r.status is JobStatus.SUCCEEDED:
            served[r.tenant] = served.get(r.tenant, 0.0) + r.units
    got = values(exported["dq_tenant_units_served"], "_total")
    assert got.keys() == {key(tenant=t) for t in served}
    for tenant, units in served.items():
        assert got[key(tenant=tenant)] == pytest.approx(units)
    calls = {r.metrics.batch_id: r.metrics.batch_size for r in done if r.metrics.batch_id}
    sizes = [float(n) for n in calls.values() if n is not None]
    assert_histogram(exported["dq_batch_size"], "dq_batch_size", "tiny", sizes, "batch_size")
    fills = [n / 4 for n in sizes]  # DQ_MAX_BATCH_SIZE; 64² images never meet the pixel budget
    assert_histogram(exported["dq_batch_fill_ratio"], "fill", "tiny", fills, "batch_fill")


def check_events(
    exported: dict[str, list[Sample]],
    done: list[JobRecord],
    logs: list[list[dict[str, Any]]],
    run: Run,
) -> None:
    """Deliveries, the reaper, limits, dispatches."""
    attempts = Counter(
        (e["outcome"], metrics.attempt_label(e["attempt"])) for log in logs for e in log
    )
    assert ("retrying", "1") in attempts
    assert ("delivered", "2") in attempts
    assert values(exported["dq_webhook_deliveries"], "_total") == {
        key(outcome=o, attempt=a): float(n) for (o, a), n in attempts.items()
    }
    assert values(exported["dq_reaper_actions"], "_total") == {
        key(action=a): n for a, n in run.reaped.items()
    }
    limited = values(exported["dq_limit_rejections"], "_total")
    assert limited == {key(limit="max_queued"): run.rejected}
    # Each claim took a dispatch; a job canceled or failed before its start may have had one.
    dispatched = sum(values(exported["dq_dispatches"], "_total").values())
    claims = sum(r.attempt for r in done)
    assert claims <= dispatched <= claims + sum(1 for r in done if r.started_at is None)


def check_gauges(exported: dict[str, list[Sample]], target: float) -> None:
    """The queue is empty, the one worker idle and fresh."""
    assert values(exported["dq_redis_up"]) == {(): 1.0}
    assert values(exported["dq_queue_target_wait_seconds"]) == {(): target}
    assert set(values(exported["dq_jobs_queued"]).values()) == {0.0}
    assert values(exported["dq_jobs_running"]) == {key(model="tiny"): 0.0}
    assert values(exported["dq_backlog_units"])[key(model="tiny")] == pytest.approx(0, abs=1e-9)
    assert set(values(exported["dq_queue_oldest_wait_seconds"]).values()) == {0.0}
    worker = "w-metrics@test"
    states = values(exported["dq_worker_state"])
    assert states[key(worker=worker, model="tiny", state="idle")] == 1.0
    assert sum(states.values()) == 1.0
    assert values(exported["dq_worker_images_per_second"])[key(worker=worker, model="tiny")] > 0
    assert values(exported["dq_worker_heartbeat_age_seconds"])[key(worker=worker, model="tiny")] < 3
    every = ("starting", "idle", "busy", "draining")
    assert values(exported["dq_workers"]) == {
        key(model="tiny", state=s): float(s == "idle") for s in every
    }


def check_http(exported: dict[str, list[Sample]], run: Run) -> None:
    """The submits and cancels, as both gateway processes counted them together."""
    counted = values(exported["dq_http_requests"], "_total")
    assert counted[key(route="/v1/jobs", method="POST", status="202")] == len(run.jobs)
    assert counted[key(route="/v1/jobs", method="POST", status="429")] == run.rejected
    cancel = key(route="/v1/jobs/{job_id}/cancel", method="POST", status="200")
    assert counted[cancel] == run.canceled
    durations = values(exported["dq_http_request_duration_seconds"], "_count")
    assert durations[key(route="/v1/jobs", method="POST")] == len(run.jobs) + run.rejected


# --- the ledger's counts alone (no processes) ----------------------------------------------------


def test_tenants_past_the_cap_share_one_series_and_each_end_counts_once(
    rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_TENANTS", 2)
    store = store_with(rclient, margin=10)
    served: dict[str, float] = {}
    for tenant in ("ann", "ben", "cat", "dan", "ann"):
        job_id = submit_to(store, tenant)
        attempt = claim(store, job_id)
        done = Change(
            "finish",
            job_id,
            attempt=attempt,
            worker="w1",
            to=JobStatus.SUCCEEDED,
            fields={"finished_at": time.time()},
        )
        assert store.change(done).ok
        assert not store.change(done).ok  # a second write of the same end is refused, uncounted
        label = tenant if tenant in ("ann", "ben") else metrics.OTHER_TENANT
        served[label] = served.get(label, 0.0) + store.get(job_id).units  # type: ignore[union-attr]
    counts = rclient.hgetall(keys.METRICS)
    got = {k[len("served:") :]: float(v) for k, v in counts.items() if k.startswith("served:")}
    assert got == pytest.approx(served)
    assert counts["finished:m:succeeded:"] == "5"
    assert sum(int(v) for k, v in counts.items() if k.startswith("h:e2e:m:")) == 5


def submit_to(store: JobStore, tenant: str) -> str:
    """A dispatched job of `tenant`."""
    rec = record(tenant)
    assert store.submit(rec).outcome == "created"
    return rec.id
