"""The ledger's compare-and-set transitions against a real Redis."""

from __future__ import annotations

import time

import pytest
import redis

from core import keys
from core.errors import IllegalTransition
from core.jobs import TERMINAL, TRANSITIONS, JobRequest, JobStatus, Metrics, new_job_id
from core.store import Change, JobRecord, JobStore, Ledger, encode


def put(store: JobStore, status: JobStatus = JobStatus.QUEUED, attempt: int = 0) -> str:
    """A job written straight into the ledger in `status`."""
    job_id = new_job_id()
    fields = encode(
        tenant="t",
        status=status.value,
        attempt=attempt,
        created_at=time.time(),
        request=JobRequest(prompt="p", seed=1),
        metrics=Metrics(),
    )
    store.redis.hset(keys.job(job_id), mapping=fields)
    return job_id


@pytest.fixture
def store(rclient: redis.Redis) -> JobStore:
    """A ledger with a short TTL for finished jobs."""
    return JobStore(rclient, Ledger(job_ttl_s=120))


def test_every_edge_of_the_table_is_allowed_and_every_other_refused(store: JobStore) -> None:
    for source in JobStatus:
        for target in JobStatus:
            job_id = put(store, source)
            ok = store.try_transition(job_id, target)
            assert ok == (target in TRANSITIONS[source]), (source, target)


def test_changes_written_together_are_each_compared_alone(store: JobStore) -> None:
    fresh, stale, canceled = (put(store, JobStatus.RUNNING, attempt=1) for _ in range(3))
    store.transition(canceled, JobStatus.CANCELED)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CHANGES)
    applied = store.try_transitions(
        [
            Change(fresh, JobStatus.SUCCEEDED, expect_attempt=1, fields={"worker": "w@1"}),
            Change(stale, JobStatus.SUCCEEDED, expect_attempt=0),
            Change(canceled, JobStatus.RUNNING, expect_attempt=1, score=time.time() + 9),
        ]
    )
    assert applied == [True, False, False]
    assert [store.get(j).status for j in (fresh, stale, canceled)] == [  # type: ignore[union-attr]
        JobStatus.SUCCEEDED,
        JobStatus.RUNNING,
        JobStatus.CANCELED,
    ]
    assert store.redis.zscore(keys.RUNNING, canceled) is None
    heard = [pubsub.get_message(timeout=1) for _ in range(2)]
    assert [m["data"] for m in heard if m] == [f"{fresh} succeeded"]
    assert store.try_transitions([]) == []


def test_terminal_states_never_change(store: JobStore) -> None:
    for status in TERMINAL:
        job_id = put(store, status)
        with pytest.raises(IllegalTransition):
            store.transition(job_id, JobStatus.RUNNING)


def test_a_stale_attempt_loses(store: JobStore) -> None:
    job_id = put(store, JobStatus.RUNNING, attempt=2)
    assert not store.try_transition(job_id, JobStatus.SUCCEEDED, expect_attempt=1)
    assert store.try_transition(job_id, JobStatus.SUCCEEDED, expect_attempt=2)
    record = store.get(job_id)
    assert record is not None
    assert record.status is JobStatus.SUCCEEDED


def test_indexes_follow_the_status(store: JobStore, rclient: redis.Redis) -> None:
    job_id = put(store)
    store.transition(job_id, JobStatus.RUNNING, score=99.0)
    assert rclient.zscore(keys.RUNNING, job_id) == 99.0
    store.transition(job_id, JobStatus.QUEUED)
    assert rclient.zscore(keys.RUNNING, job_id) is None
    assert rclient.zscore(keys.QUEUED, job_id) is not None
    assert rclient.llen("dq.jobs") == 1  # going back to the queue sends a fresh message


def test_finished_records_expire(store: JobStore, rclient: redis.Redis) -> None:
    job_id = put(store)
    store.transition(job_id, JobStatus.CANCELED)
    assert 0 < rclient.ttl(keys.job(job_id)) <= 120


def test_missing_job_is_refused(store: JobStore) -> None:
    with pytest.raises(IllegalTransition):
        store.transition("job_missing", JobStatus.RUNNING)


def test_record_round_trips(store: JobStore) -> None:
    job_id = put(store)
    record = store.get(job_id)
    assert isinstance(record, JobRecord)
    assert (record.status, record.attempt, record.request.prompt) == (JobStatus.QUEUED, 0, "p")


def test_the_reaper_guard_refuses_a_renewed_lease(store: JobStore) -> None:
    job_id = put(store)
    store.transition(job_id, JobStatus.RUNNING, score=time.time() + 30)
    assert not store.try_transition(job_id, JobStatus.QUEUED, lease_ended_by=time.time())
    store.transition(job_id, JobStatus.RUNNING, score=time.time() - 1)
    assert store.try_transition(job_id, JobStatus.QUEUED, lease_ended_by=time.time())
