"""The ledger's scripts against a real Redis: claims, renewals, outcomes, dispatch, limits."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis

from core import keys
from core.errors import UnreadableRecord
from core.jobs import JobRequest, JobStatus, Metrics, new_job_id
from core.records import JobRecord, decode
from core.store import Change, DispatchConfig, JobStore, Ledger

LEASE = 30.0


def record(
    tenant: str = "t", priority: str = "normal", model: str = "m", **request: object
) -> JobRecord:
    """A job to submit (64 x 64, 4 steps unless told otherwise)."""
    fields: dict[str, object] = {"prompt": "p", "seed": 1, "width": 64, "height": 64, "steps": 4}
    req = JobRequest.model_validate({**fields, **request, "priority": priority})
    return JobRecord(
        id=new_job_id(),
        tenant=tenant,
        status=JobStatus.QUEUED,
        attempt=0,
        created_at=time.time(),
        request=req,
        model=model,
        priority=priority,
        units=req.units,
        metrics=Metrics(),
    )


def submit(store: JobStore, tenant: str = "t", priority: str = "normal", **request: object) -> str:
    """Submit one job; its id."""
    rec = record(tenant, priority, **request)
    assert store.submit(rec).outcome == "created"
    return rec.id


def store_with(rclient: redis.Redis, **dispatch: object) -> JobStore:
    """A ledger whose window is `margin` messages (no workers), other knobs as given."""
    config = DispatchConfig(**{"margin": 1, **dispatch})  # type: ignore[arg-type]
    return JobStore(rclient, Ledger(job_ttl_s=120, dispatch=config))


@pytest.fixture
def store(rclient: redis.Redis) -> JobStore:
    """A ledger with a window of one message."""
    return store_with(rclient)


def claim(store: JobStore, job_id: str, worker: str = "w1") -> int:
    """Claim a dispatched job; the attempt the script gave it (0 if refused)."""
    applied = store.change(Change("claim", job_id, worker=worker, lease=time.time() + LEASE))
    return applied.attempt if applied.ok else 0


def dispatched(store: JobStore) -> list[str]:
    """The model's window, oldest first."""
    return [str(j) for j in store.redis.zrange(keys.dispatched("m"), 0, -1)]


def drain(store: JobStore, n: int) -> list[str]:
    """Claim and finish the window's jobs one at a time, `n` times: the dispatch order."""
    order = []
    for _ in range(n):
        window = dispatched(store)
        if not window:
            break
        job_id = window[0]
        attempt = claim(store, job_id)
        finish = Change("finish", job_id, attempt, "w1", to=JobStatus.SUCCEEDED)
        store.must(finish)
        order.append(job_id)
    return order


def tenant_of(store: JobStore, job_id: str) -> str:
    """A job's tenant."""
    return str(store.redis.hget(keys.job(job_id), "tenant"))


def test_a_job_is_dispatched_at_once_and_claimed_once_with_an_attempt_the_script_counts(
    store: JobStore,
) -> None:
    job_id = submit(store)
    assert dispatched(store) == [job_id]
    assert store.redis.llen("dq.jobs.m") == 1  # its Celery message, in the model's queue
    assert claim(store, job_id, "w1") == 1
    assert claim(store, job_id, "w2") == 0  # a second message for it claims nothing
    rec = store.get(job_id)
    assert rec is not None
    assert (rec.status, rec.attempt, rec.worker) == (JobStatus.RUNNING, 1, "w1")


def test_a_waiting_job_cannot_be_claimed_before_it_is_dispatched(store: JobStore) -> None:
    first, second = submit(store), submit(store)
    assert dispatched(store) == [first]  # a window of one
    assert claim(store, second) == 0
    assert claim(store, first) == 1
    assert dispatched(store) == [second]  # the claim freed the window: the next went out


def test_an_attempt_that_lost_its_lease_can_never_take_its_job_back(store: JobStore) -> None:
    job_id = submit(store)
    assert claim(store, job_id, "w1") == 1
    store.redis.zadd(keys.RUNNING, {job_id: time.time() - 1})  # w1 froze past its lease
    assert store.change(Change("handback", job_id, attempt=1, cutoff=time.time())).ok
    # Back in the queue, and out again: w1 renewing now would take it back; it may not.
    late = Change("renew", job_id, attempt=1, worker="w1", lease=time.time() + LEASE)
    assert not store.change(late).ok
    assert claim(store, job_id, "w2") == 2
    assert not store.change(late).ok  # not as attempt 1, not from w1
    done = Change("finish", job_id, attempt=1, worker="w1", to=JobStatus.SUCCEEDED)
    assert not store.change(done).ok
    other = Change("renew", job_id, attempt=2, worker="w1", lease=time.time() + LEASE)
    assert not store.change(other).ok  # the right attempt from the wrong worker
    mine = Change("finish", job_id, attempt=2, worker="w2", to=JobStatus.SUCCEEDED)
    assert store.change(mine).ok
    assert store.get(job_id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_a_renewed_lease_is_not_handed_back(store: JobStore) -> None:
    job_id = submit(store)
    claim(store, job_id)
    assert not store.change(Change("handback", job_id, attempt=1, cutoff=time.time())).ok


def test_changes_written_together_are_each_compared_alone(store: JobStore) -> None:
    store = store_with(store.redis, margin=3)
    ids = [submit(store) for _ in range(3)]
    for job_id in ids:
        claim(store, job_id)
    store.must(Change("cancel", ids[2]))
    applied = store.apply(
        [
            Change("finish", ids[0], 1, "w1", to=JobStatus.SUCCEEDED),
            Change("finish", ids[1], 0, "w1", to=JobStatus.SUCCEEDED),  # a stale attempt
            Change("renew", ids[2], 1, "w1", lease=time.time() + LEASE),  # canceled meanwhile
        ]
    )
    assert [a.ok for a in applied] == [True, False, False]
    statuses = [store.get(j).status for j in ids]  # type: ignore[union-attr]
    assert statuses == [JobStatus.SUCCEEDED, JobStatus.RUNNING, JobStatus.CANCELED]


def test_terminal_states_never_change_and_every_counter_returns_to_zero(store: JobStore) -> None:
    store = store_with(store.redis, margin=2)
    waiting, out, running = (submit(store, t) for t in ("a", "b", "c"))
    claim(store, out)  # now `out` is running and `running` went out
    out, running = running, out
    for job_id in (waiting, out, running):
        assert store.change(Change("cancel", job_id)).ok
        assert not store.change(Change("cancel", job_id)).ok
        assert not store.change(Change("fail", job_id)).ok
        assert claim(store, job_id) == 0
    assert store.redis.hget(keys.STATS, "queued") == "0"
    for tenant in ("a", "b", "c"):
        assert store.redis.hgetall(keys.usage(tenant)) == {"queued": "0", "inflight": "0"}
    assert store.redis.zcard(keys.dispatched("m")) == 0
    assert store.redis.zcard(keys.RUNNING) == 0
    assert store.redis.zcard(keys.lines("m", "normal")) == 0
    assert store.redis.zcard(keys.EXPIRING) == 3


def test_a_handed_back_job_goes_to_the_front_of_its_line(store: JobStore) -> None:
    first, *rest = [submit(store) for _ in range(4)]
    claim(store, first)
    store.redis.zadd(keys.RUNNING, {first: time.time() - 1})
    assert store.change(Change("handback", first, attempt=1, cutoff=time.time())).ok
    order = drain(store, 5)
    assert order[:2] == [rest[0], first]  # the window's job first, then the handed-back one


def test_a_light_tenant_is_not_stuck_behind_a_heavy_one(store: JobStore) -> None:
    heavy = [submit(store, "heavy") for _ in range(30)]
    light = [submit(store, "light") for _ in range(3)]
    order = drain(store, 33)
    assert set(order) == set(heavy) | set(light)
    # Equal weights: the light tenant's jobs alternate with the heavy one's.
    assert max(order.index(j) for j in light) <= 6


def test_weights_share_the_work_units_served(store: JobStore) -> None:
    store.redis.hset(keys.tenant("three"), "weight", "3")
    for _ in range(60):
        submit(store, "three")
        submit(store, "one")
    served = Counter(tenant_of(store, j) for j in drain(store, 40))
    assert served["three"] / served["one"] == pytest.approx(3.0, rel=0.15)


def test_weights_are_charged_by_work_units_not_jobs(store: JobStore) -> None:
    for _ in range(30):
        submit(store, "big", steps=16)  # four times the work of a 4-step job
        submit(store, "small", steps=4)
    served = Counter(tenant_of(store, j) for j in drain(store, 25))
    assert served["small"] / served["big"] == pytest.approx(4.0, rel=0.25)


def test_high_overtakes_normal_and_an_old_low_job_goes_before_both(rclient: redis.Redis) -> None:
    store = store_with(rclient, low_max_wait_s=0.5)
    normal = [submit(store, "n") for _ in range(5)]
    low = submit(store, "l", "low")
    high = submit(store, "h", "high")
    assert drain(store, 2) == [normal[0], high]  # the first went out before `high` existed
    time.sleep(0.6)  # past the aging bound
    assert drain(store, 2) == [normal[1], low]


def test_a_tenant_never_has_more_dispatched_or_running_than_its_cap(store: JobStore) -> None:
    store = store_with(store.redis, margin=10)
    store.redis.hset(keys.tenant("capped"), "max_running", "2")
    capped = [submit(store, "capped") for _ in range(5)]
    free = [submit(store, "free") for _ in range(5)]
    assert set(dispatched(store)) == set(capped[:2]) | set(free)
    claim(store, capped[0])
    assert set(dispatched(store)) == {capped[1], *free}  # running still counts against the cap
    store.must(Change("finish", capped[0], 1, "w1", to=JobStatus.SUCCEEDED))
    assert capped[2] in dispatched(store)  # an end frees the cap: dispatched at once


def test_fifo_mode_keeps_arrival_order(rclient: redis.Redis) -> None:
    store = store_with(rclient, fifo=True)
    ids = [submit(store, "heavy") for _ in range(5)] + [submit(store, "light", "high")]
    assert drain(store, 6) == ids


def test_the_rate_limit_allows_a_burst_then_one_per_interval(store: JobStore) -> None:
    limits = {"rate": 2.0, "burst": 3}
    outcomes = [store.submit(record(), limits) for _ in range(4)]
    assert [a.outcome for a in outcomes] == ["created"] * 3 + ["limited"]
    assert outcomes[3].limit == "rate"
    assert 0.3 < outcomes[3].retry_after_s <= 0.5
    time.sleep(outcomes[3].retry_after_s)
    assert store.submit(record(), limits).outcome == "created"


def test_max_queued_and_the_quota_refuse_and_name_their_limit(store: JobStore) -> None:
    full = [store.submit(record("q"), {"max_queued": 2}) for _ in range(3)]
    assert [a.outcome for a in full] == ["created", "created", "limited"]
    assert full[2].limit == "max_queued"
    one = record().units
    quota = {"quota": 2.5 * one, "quota_window": 60}
    used = [store.submit(record("u"), quota) for _ in range(3)]
    assert [a.outcome for a in used] == ["created", "created", "limited"]
    assert used[2].limit == "quota"
    assert 0 < used[2].retry_after_s <= 60


def test_concurrent_submits_at_a_limit_never_exceed_it(redis_url: str) -> None:
    clients = [redis.Redis.from_url(redis_url, decode_responses=True) for _ in range(50)]
    stores = [store_with(c) for c in clients]
    created = Counter[str]()
    lock = threading.Lock()

    def hammer(s: JobStore) -> None:
        for _ in range(4):
            outcome = s.submit(record("edge"), {"max_queued": 37}).outcome
            with lock:
                created[outcome] += 1

    threads = [threading.Thread(target=hammer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == {"created": 37, "limited": 163}
    assert stores[0].redis.hget(keys.usage("edge"), "queued") == "37"


def test_a_record_with_a_field_from_a_newer_writer_is_read(store: JobStore) -> None:
    job_id = submit(store)
    request = json.loads(str(store.redis.hget(keys.job(job_id), "request")))
    request["added_later"] = {"x": 1}
    store.redis.hset(keys.job(job_id), mapping={"request": json.dumps(request), "new": "y"})
    rec = store.get(job_id)
    assert rec is not None
    assert rec.request.prompt == "p"


def test_an_unreadable_record_is_quarantined_and_then_reads(store: JobStore) -> None:
    job_id = submit(store)
    deep: dict[str, object] = {}
    cur = deep
    for _ in range(300):
        cur["a"] = {}
        cur = cur["a"]  # type: ignore[assignment]
    request = json.loads(str(store.redis.hget(keys.job(job_id), "request")))
    store.redis.hset(keys.job(job_id), "request", json.dumps({**request, "metadata": deep}))
    with pytest.raises(UnreadableRecord):
        store.get(job_id)
    assert store.quarantine(job_id)
    rec = decode(job_id, store.redis.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
    assert rec is not None
    assert rec.status is JobStatus.FAILED
    assert rec.error is not None
    assert rec.error.code == "unreadable_record"
    assert (rec.request.prompt, rec.request.metadata) == ("p", {})


def test_a_buffered_duplicate_handed_back_never_takes_a_running_job(store: JobStore) -> None:
    # A worker draining (or dying) hands back the jobs of the messages it buffered; one may be a
    # duplicate of a job that runs, on it or elsewhere: that job must stay with its attempt.
    job_id = submit(store)
    assert claim(store, job_id, "w1") == 1
    assert not store.change(Change("undispatch", job_id)).ok
    running = store.get(job_id)
    assert running is not None
    assert (running.status, running.attempt, running.worker) == (JobStatus.RUNNING, 1, "w1")
    waiting = submit(store)  # dispatched (the claim freed the window), not claimed
    assert store.change(Change("undispatch", waiting)).ok
    assert dispatched(store) == [waiting]  # back at the front of its line, and out again


def test_the_window_holds_each_live_workers_next_batch_and_no_more(rclient: redis.Redis) -> None:
    from core import heartbeats
    from core.heartbeats import WorkerBeat, WorkerState
    from worker.batcher import Limits
    from worker.runner import Runner

    store = store_with(rclient, margin=2)
    runner = Runner(
        rclient,
        store,
        Limits(max_rows=4, max_pixels=10**9, timeout_s=0.0),
        lambda: None,  # type: ignore[arg-type,return-value]
        name="w@test",
        model="m",
        queue="dq.jobs.m",
        heartbeat_s=1.0,
        prefetch=8,
    )
    # Its prefetch holds the running batch's messages too: it asks for one batch ahead.
    assert runner.ahead() == 4
    now = time.time()
    beat = WorkerBeat(name="w@test", state=WorkerState.BUSY, started_at=now, at=now, model="m")
    heartbeats.publish(rclient, beat.model_copy(update={"prefetch": runner.ahead()}))
    ids = [submit(store) for _ in range(12)]
    assert dispatched(store) == ids[:6]  # the margin (2) and one batch of 4
    late = submit(store, tenant="light")
    for job_id in ids[:4]:  # the worker takes its next batch: the light tenant's job goes out
        claim(store, job_id)
    assert late in dispatched(store)


def test_a_tenants_retention_keeps_its_jobs_no_longer_than_the_deployment_allows(
    rclient: redis.Redis,
) -> None:
    from core.tenants import KeyStore

    store = JobStore(rclient, Ledger(job_ttl_s=120, dispatch=DispatchConfig(margin=10)))
    KeyStore(rclient).set_limits("short", {"retention_s": 30})
    KeyStore(rclient).set_limits("greedy", {"retention_s": 86_400})
    kept = {}
    for tenant in ("short", "greedy", "plain"):
        job_id = submit(store, tenant)
        attempt = claim(store, job_id)
        assert store.change(Change("finish", job_id, attempt, "w1", to=JobStatus.SUCCEEDED)).ok
        kept[tenant] = rclient.ttl(keys.job(job_id))
    assert 25 <= kept["short"] <= 30
    assert 115 <= kept["greedy"] <= 120  # capped at the deployment's DQ_JOB_TTL_S
    assert 115 <= kept["plain"] <= 120
