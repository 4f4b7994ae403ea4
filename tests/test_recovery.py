"""The recovery sweep against a real Redis (and real storage, and a real worker where it counts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from core import broker, heartbeats, keys
from core.heartbeats import WorkerBeat, WorkerState
from core.jobs import JobStatus
from core.recovery import Recovery, RecoveryConfig
from core.storage import FileStore, image_key
from core.store import Change, JobStore, Ledger
from tests.conftest import WorkerProcess, settings_from
from tests.test_store import claim, dispatched, record, store_with, submit
from worker.app import served

QUEUE = "dq.jobs.m"


def recovery(store: JobStore, **config: float) -> Recovery:
    """A sweep over `store`, with short knobs."""
    knobs = {"heartbeat_ttl_s": 0.0, "lost_s": 0.3, "interval_s": 0.01, **config}
    return Recovery(store.redis, store, RecoveryConfig(**knobs))  # type: ignore[arg-type]


def beat(name: str, jobs: list[str], at: float, held: list[str] | None = None) -> WorkerBeat:
    """A heartbeat of a worker serving model `m`, sent at `at`."""
    return WorkerBeat(
        name=name,
        state=WorkerState.BUSY,
        started_at=at - 60,
        at=at,
        model="m",
        jobs=jobs,
        held=held or [],
    )


def test_an_expired_lease_goes_back_to_the_front_or_fails_after_its_attempts(
    rclient: redis.Redis,
) -> None:
    store = store_with(rclient, margin=2)
    retried, spent = submit(store), submit(store)
    claim(store, retried)
    claim(store, spent)
    rclient.hset(keys.job(spent), "attempt", "3")
    rclient.zadd(keys.RUNNING, {retried: time.time() - 1, spent: time.time() - 1})
    swept = recovery(store, max_attempts=3).sweep()
    assert (swept.requeued, swept.failed) == (1, 1)
    back, failed = store.get(retried), store.get(spent)
    assert back is not None
    assert failed is not None
    assert (back.status, back.attempt) == (JobStatus.QUEUED, 1)
    assert failed.error is not None
    assert (failed.status, failed.error.code) == (JobStatus.FAILED, "max_attempts")
    assert rclient.hgetall(keys.METRICS)["reaper:requeued"] == "1"


def test_a_dispatched_job_a_dead_worker_held_goes_out_again_at_once(rclient: redis.Redis) -> None:
    store = store_with(rclient, margin=2)
    held_by_dead, held_by_live = submit(store), submit(store)
    rclient.delete(QUEUE)  # both messages were taken by workers
    now = time.time()
    heartbeats.publish(rclient, beat("dead@x", [held_by_dead], now - 60))
    heartbeats.publish(rclient, beat("live@x", [held_by_live], now))
    sweep = recovery(store, heartbeat_ttl_s=5.0)
    rclient.zadd(keys.dispatched("m"), {held_by_dead: now - 90, held_by_live: now - 90})
    assert sweep.sweep().redispatched == 1  # not waiting for a second sweep: its holder is dead
    assert [m for m in rclient.lrange(QUEUE, 0, -1) if held_by_dead in str(m)]
    assert not [m for m in rclient.lrange(QUEUE, 0, -1) if held_by_live in str(m)]


def test_a_worker_beating_with_a_stale_loop_holds_nothing(rclient: redis.Redis) -> None:
    store = store_with(rclient, margin=2)
    job_id = submit(store)
    rclient.delete(QUEUE)  # its message went to a worker whose pipeline then hung
    now = time.time()
    hung = beat("hung@x", [job_id], now).model_copy(update={"loop_at": now - 600})
    heartbeats.publish(rclient, hung)  # its heartbeat thread beats on
    rclient.zadd(keys.dispatched("m"), {job_id: now - 30})
    swept = recovery(store, heartbeat_ttl_s=5.0, loop_stale_s=120.0, lost_s=60.0).sweep()
    assert swept.redispatched == 1
    assert [m for m in rclient.lrange(QUEUE, 0, -1) if job_id in str(m)]


def test_a_dead_workers_last_beat_says_nothing_of_the_jobs_later_dispatches(
    rclient: redis.Redis,
) -> None:
    store = store_with(rclient, margin=2)
    job_id = submit(store)
    rclient.delete(QUEUE)  # a live worker took its message, and is reading its record
    now = time.time()
    # A worker that died a minute ago held the job's first dispatch; it went out again since.
    heartbeats.publish(rclient, beat("dead@x", [job_id], now - 60))
    rclient.zadd(keys.dispatched("m"), {job_id: now - 30})
    assert recovery(store, heartbeat_ttl_s=5.0, lost_s=60.0).sweep().redispatched == 0
    assert rclient.llen(QUEUE) == 0


def test_a_message_a_dead_worker_took_after_its_last_beat_goes_out_again_at_once(
    rclient: redis.Redis,
) -> None:
    store = store_with(rclient, margin=2)
    job_id = submit(store)
    (message,) = [m for m in rclient.lrange(QUEUE, 0, -1) if job_id in str(m)]
    # kombu took the message off the list and recorded it as received; its worker was killed
    # before its next heartbeat named the job.
    rclient.lrem(QUEUE, 1, message)
    now = time.time()
    rclient.hset(broker.UNACKED, "tag-1", json.dumps([json.loads(message), "", QUEUE]))
    rclient.zadd(broker.UNACKED_INDEX, {"tag-1": now - 30})
    heartbeats.publish(rclient, beat("dead@x", [], now - 60))
    rclient.zadd(keys.dispatched("m"), {job_id: now - 30})
    swept = recovery(store, heartbeat_ttl_s=5.0, lost_s=60.0).sweep()
    assert (swept.redispatched, swept.forgotten) == (1, 1)  # not DQ_LOST_MESSAGE_S later
    assert [m for m in rclient.lrange(QUEUE, 0, -1) if job_id in str(m)]
    assert rclient.hlen(broker.UNACKED) == 0


def test_a_lost_dispatch_goes_out_again_after_two_sweeps_and_runs_once(
    env: dict[str, str],
    rclient: redis.Redis,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    settings = settings_from(env)
    store = JobStore(rclient, Ledger.of(settings))
    model = served(settings)
    queue = store.ledger.queue_of(model)
    ids = [store.submit(record(model=model)).value for _ in range(2)]
    for job_id in ids:
        rclient.hset(keys.job(job_id), "model", model)
    lost, listed = ids
    # kombu took `lost`'s message off the list and its worker died before recording it.
    for message in rclient.lrange(queue, 0, -1):
        if lost in str(message):
            rclient.lrem(queue, 1, message)
    old = time.time() - 100
    rclient.zadd(keys.dispatched(model), {lost: old, listed: old})
    sweep = recovery(store, lost_s=0.3)
    assert sweep.sweep().redispatched == 0  # the first sweep that misses it only notes it
    time.sleep(0.35)
    assert sweep.sweep().redispatched == 1  # missed twice, lost_s apart: out again
    assert sweep.sweep().redispatched == 0  # `listed` has its message: never touched
    worker_factory(env)
    for job_id in ids:
        deadline = time.monotonic() + 60
        while (rec := store.get(job_id)) is None or not rec.status.terminal:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (rec.status, rec.attempt) == (JobStatus.SUCCEEDED, 1)


def test_kombus_record_of_a_dead_workers_job_messages_is_dropped_never_the_senders(
    rclient: redis.Redis,
) -> None:
    store = store_with(rclient)
    old = time.time() - 100
    for tag, queue in (("dead", QUEUE), ("alive", QUEUE), ("webhook", "dq.webhooks")):
        message = json.dumps([{"body": "[]"}, "", queue])
        rclient.hset(broker.UNACKED, tag, message)
        rclient.zadd(broker.UNACKED_INDEX, {tag: old})
    rclient.sadd(keys.MODELS, "m")
    heartbeats.publish(rclient, beat("live@x", [], time.time(), held=["alive"]))
    assert recovery(store, heartbeat_ttl_s=5.0).sweep().forgotten == 1
    assert sorted(rclient.hkeys(broker.UNACKED)) == ["alive", "webhook"]


def test_an_expired_job_leaves_its_index_and_its_images_are_deleted(
    rclient: redis.Redis, tmp_path: Path
) -> None:
    store = store_with(rclient)
    files = FileStore(tmp_path, b"k")
    job_id = submit(store, "t")
    attempt = claim(store, job_id)
    store.must(Change("finish", job_id, attempt, "w1", to=JobStatus.SUCCEEDED))
    files.put(image_key("", job_id, 0, "png"), b"png", "image/png")
    files.put(f"{job_id}/input-image.png", b"png", "image/png")
    other = submit(store, "t")
    rclient.zadd(keys.EXPIRING, {f"t {job_id}": time.time() - 1})
    sweep = Recovery(rclient, store, RecoveryConfig(), files)
    assert sweep.sweep().expired == 1
    assert not (tmp_path / job_id).exists()
    assert rclient.zrange(keys.tenant_jobs("t"), 0, -1) == [other]


def test_an_expired_job_in_s3_loses_its_objects(rclient: redis.Redis, s3_endpoint: str) -> None:
    import boto3

    from core.storage import open_store

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="expiry")
    s3 = open_store("s3://expiry/out", secret=b"", endpoint_url=s3_endpoint)
    store = store_with(rclient)
    job_id, keep = "job_" + "1" * 32, "job_" + "2" * 32
    for name in (job_id, keep):
        s3.put(f"out/{name}/0.png", b"png", "image/png")
    rclient.zadd(keys.EXPIRING, {f"t {job_id}": time.time() - 1})
    assert Recovery(rclient, store, RecoveryConfig(), s3, "out").sweep().expired == 1
    listed = s3.client.list_objects_v2(Bucket="expiry", Prefix="out/")  # type: ignore[union-attr]
    assert [o["Key"] for o in listed["Contents"]] == [f"out/{keep}/0.png"]


def test_workers_gone_for_an_hour_are_forgotten(rclient: redis.Redis) -> None:
    rclient.sadd(keys.MODELS, "m")
    now = time.time()
    heartbeats.publish(rclient, beat("gone@x", [], now - 4000).model_copy(update={"prefetch": 4}))
    heartbeats.publish(rclient, beat("here@x", [], now))
    recovery(store_with(rclient)).sweep()
    assert rclient.zrange(keys.WORKERS, 0, -1) == ["here@x"]
    assert rclient.zcard(keys.pool("m")) == 0


def test_one_sweep_per_interval_whoever_offers(rclient: redis.Redis) -> None:
    store = store_with(rclient)
    sweeps = [recovery(store, interval_s=0.5) for _ in range(3)]
    assert [s.offer() is not None for s in sweeps] == [True, False, False]
    time.sleep(0.55)
    assert sweeps[2].offer() is not None


def test_a_part_that_fails_does_not_stop_the_others(
    rclient: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenStore(FileStore):
        def delete_folder(self, folder: str) -> int:
            raise OSError("the disk went away")

    store = store_with(rclient)
    job_id = submit(store)
    claim(store, job_id)
    rclient.zadd(keys.RUNNING, {job_id: time.time() - 1})
    rclient.zadd(keys.EXPIRING, {"t job_" + "3" * 32: time.time() - 1})
    swept = Recovery(rclient, store, RecoveryConfig(), BrokenStore(tmp_path, b"k")).sweep()
    assert swept.requeued == 1
    assert "expired jobs failed" in caplog.text
    assert dispatched(store) == [job_id]  # handed back and, the window being free, out again
